pub fn parse_str(_t: &str, _n: &str, _e: &dyn Fn(&str) -> Option<String>) -> Result<super::Config, super::ConfigError> { todo!() }
