// rampart next to the users' backend under PM2 (docs/operations.md#pm2).
//
//   pm2 start examples/pm2/ecosystem.config.js   # with the backend's own entry, or on its own
//   pm2 sendSignal SIGHUP rampart                # reload proxy.yaml (an invalid file is refused)
//   pm2 stop rampart                             # SIGINT: rampart's drain, then exit 0
//
// The backend listens on 127.0.0.1:3001 (BACKEND_URL in proxy.yaml) and sends its FastGPT
// calls to http://127.0.0.1:8081; clients reach it through rampart on :8080.
// The test `deploy::host::the_pm2_entry_runs_the_binary_and_waits_for_the_drain` loads this
// file with node.
module.exports = {
  apps: [
    {
      name: "rampart",
      script: "/usr/local/bin/rampart",
      args: "run /etc/rampart/proxy.yaml",
      // A native binary: no Node interpreter, one process (PM2's cluster mode is for Node
      // code; rampart has its own worker threads, `--workers`, one per CPU by default).
      interpreter: "none",
      exec_mode: "fork",
      instances: 1,
      // PM2 stops with SIGINT, which rampart treats as SIGTERM (the drain), then SIGKILL
      // after kill_timeout: above drain.accept_grace + drain.timeout (5s + 30s) with a margin.
      kill_timeout: 45000,
      autorestart: true,
      // 2: an invalid configuration, 64: a usage error; restarting cannot fix either.
      stop_exit_codes: [2, 64],
      min_uptime: 5000,
      max_restarts: 10,
      restart_delay: 1000,
      env: {
        RAMPART_CONFIG: "/etc/rampart/proxy.yaml",
        // The token is only needed off loopback (the default admin address is 127.0.0.1:9901);
        // set it in the environment PM2 starts from, never in this file.
        RAMPART_ADMIN_TOKEN: process.env.RAMPART_ADMIN_TOKEN || "",
        FASTGPT_URL: process.env.FASTGPT_URL || "http://127.0.0.1:3000",
      },
    },
  ],
};
