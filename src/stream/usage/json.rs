//! The JSON tokenizer the meter runs over a JSON body or each event's data: only keys at
//! their place count (see the parent module).

use super::*;

/// What the tokenizer expects next, between tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// A value (the root, or after a colon or an array's comma).
    Value,
    /// Just past `[`: a value or `]`.
    ValueOrClose,
    /// Just past `{`: a key or `}`.
    KeyOrClose,
    /// Past an object's comma: a key.
    Key,
    Colon,
    /// Past a value in a container.
    CommaOrClose,
    /// Past the root value: only whitespace.
    Done,
    /// Not one JSON text: the rest is skipped.
    Failed,
}

/// Inside a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lex {
    None,
    Str {
        key: bool,
        esc: Esc,
    },
    Num(Num),
    /// `true`, `false` or `null`, `at` bytes matched.
    Lit {
        word: &'static [u8],
        at: u8,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Esc {
    None,
    /// Just past a backslash.
    Backslash,
    /// In `\uXXXX`, `n` digits read.
    Hex {
        n: u8,
        value: u16,
    },
}

/// The JSON number grammar, state by state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Num {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    Exp,
    ExpSign,
    ExpDigits,
}

/// What a container or value is to the meter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The root object: `usage`, `responseData`.
    Root,
    /// The root object's `usage`.
    Usage,
    /// An array of node responses at a level.
    Nodes(u8),
    /// A node response at a level.
    Node(u8),
}

/// Where the value about to begin sits, when that matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    None,
    /// The root value.
    Top,
    Usage,
    ResponseData,
    /// `usage.prompt_tokens` (0) or `usage.completion_tokens` (1).
    UsageCount(u8),
    /// A node's count key, by index in [`NODE_KEYS`].
    NodeCount(u8, u8),
    /// A node's detail array, by the node's level.
    Detail(u8),
    /// An element of a node array, by level.
    NodeElem(u8),
}

/// One node response's counts, by [`NODE_KEYS`], present when their bit is set.
#[derive(Debug, Clone, Copy, Default)]
struct Node {
    counts: [u64; 6],
    present: u8,
}

impl Node {
    fn usage(&self) -> Option<Usage> {
        let get = |i: usize| {
            if self.present & (1 << i) != 0 {
                self.counts.get(i).copied().unwrap_or(0)
            } else {
                0
            }
        };
        if self.present & 0b1111 != 0 {
            Some(Usage {
                prompt: get(0).saturating_add(get(1)),
                completion: get(2).saturating_add(get(3)),
            })
        } else if self.present != 0 {
            Some(Usage {
                prompt: get(4).saturating_add(get(5)),
                completion: 0,
            })
        } else {
            None
        }
    }
}

/// A streaming JSON tokenizer that keeps only the counts at the places above.
#[derive(Debug, Clone)]
pub(super) struct Json {
    expect: Expect,
    lex: Lex,
    /// Open containers, bit `d` set when the one at depth `d + 1` is an object.
    objects: u128,
    depth: u8,
    /// How many open containers, from the root, have a role (the rest have none).
    chain: u8,
    roles: [Role; CHAIN_CAP],
    /// The current key of an object with a role, up to [`KEY_CAP`] bytes.
    key: [u8; KEY_CAP],
    /// Its length; past [`KEY_CAP`], a key of no interest.
    key_len: usize,
    /// The slot of the value after the colon.
    pending: Slot,
    /// Where the number being read goes, and its value while it is a u64.
    num_slot: Slot,
    num: Option<u64>,
    /// `usage.prompt_tokens` and `usage.completion_tokens` of the root object.
    usage: [Option<u64>; 2],
    /// The open nodes, by level.
    nodes: [Node; NODE_CAP],
    /// The sums of the nodes closed.
    pub(super) flow: Option<Usage>,
    /// The root value is an object (`Some(true)`) or an array (`Some(false)`).
    pub(super) top_object: Option<bool>,
}

impl Json {
    pub(super) fn new() -> Json {
        Json {
            expect: Expect::Value,
            lex: Lex::None,
            objects: 0,
            depth: 0,
            chain: 0,
            roles: [Role::Root; CHAIN_CAP],
            key: [0; KEY_CAP],
            key_len: 0,
            pending: Slot::None,
            num_slot: Slot::None,
            num: None,
            usage: [None; 2],
            nodes: [Node::default(); NODE_CAP],
            flow: None,
            top_object: None,
        }
    }

    /// As new, writing only what is read before it is written again: `roles`, `nodes`
    /// and `key` are set on opening a container with a role, a node and a key.
    pub(super) fn reset(&mut self) {
        self.expect = Expect::Value;
        self.lex = Lex::None;
        self.objects = 0;
        self.depth = 0;
        self.chain = 0;
        self.key_len = 0;
        self.pending = Slot::None;
        self.num_slot = Slot::None;
        self.num = None;
        self.usage = [None; 2];
        self.flow = None;
        self.top_object = None;
    }

    /// One whole JSON text was read (and only whitespace since).
    pub(super) fn complete(&self) -> bool {
        self.expect == Expect::Done
    }

    pub(super) fn usage(&self) -> Option<Usage> {
        match self.usage {
            [None, None] => None,
            [p, c] => Some(Usage {
                prompt: p.unwrap_or(0),
                completion: c.unwrap_or(0),
            }),
        }
    }

    pub(super) fn feed(&mut self, chunk: &[u8]) {
        let mut i = 0;
        while i < chunk.len() {
            if self.expect == Expect::Failed {
                return;
            }
            let rest = chunk.get(i..).unwrap_or_default();
            i += match self.lex {
                Lex::Str { key, esc } => self.string(rest, key, esc),
                Lex::Num(state) => self.number(rest, state),
                Lex::Lit { word, at } => self.literal(rest, word, at),
                Lex::None => self.structure(rest),
            };
        }
    }

    fn fail(&mut self) -> usize {
        self.expect = Expect::Failed;
        0
    }

    /// Between tokens: whitespace, punctuation, or the first byte of a token. Returns the
    /// bytes consumed.
    fn structure(&mut self, rest: &[u8]) -> usize {
        let ws = rest
            .iter()
            .position(|&b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
            .unwrap_or(rest.len());
        let Some(&b) = rest.get(ws) else {
            return ws;
        };
        let ok = match (self.expect, b) {
            (Expect::Value | Expect::ValueOrClose, _) if self.begin_value(b) => true,
            (Expect::ValueOrClose, b']') | (Expect::CommaOrClose, b']') => self.close(false),
            (Expect::KeyOrClose, b'}') | (Expect::CommaOrClose, b'}') => self.close(true),
            (Expect::KeyOrClose | Expect::Key, b'"') => {
                self.key_len = 0;
                self.lex = Lex::Str {
                    key: true,
                    esc: Esc::None,
                };
                true
            }
            (Expect::Colon, b':') => {
                self.pending = self.key_slot();
                self.expect = Expect::Value;
                true
            }
            (Expect::CommaOrClose, b',') => {
                self.expect = if self.in_object() {
                    Expect::Key
                } else {
                    Expect::Value
                };
                true
            }
            _ => false,
        };
        if !ok {
            return self.fail();
        }
        ws + 1
    }

    fn in_object(&self) -> bool {
        self.depth > 0 && self.objects & (1 << (self.depth - 1)) != 0
    }

    /// The role of the innermost open container, if it has one.
    fn parent_role(&self) -> Option<Role> {
        if self.depth > 0 && self.chain == self.depth {
            self.roles.get(usize::from(self.depth) - 1).copied()
        } else {
            None
        }
    }

    /// The slot of a value beginning now.
    fn value_slot(&self) -> Slot {
        if self.depth == 0 {
            return Slot::Top;
        }
        match self.parent_role() {
            Some(Role::Nodes(level)) => Slot::NodeElem(level),
            Some(Role::Root | Role::Usage | Role::Node(_)) => self.pending,
            None => Slot::None,
        }
    }

    /// The slot the key just read names, in an object with a role.
    fn key_slot(&self) -> Slot {
        let Some(key) = self.key.get(..self.key_len) else {
            return Slot::None;
        };
        match self.parent_role() {
            Some(Role::Root) => match key {
                b"usage" => Slot::Usage,
                b"responseData" => Slot::ResponseData,
                _ => Slot::None,
            },
            Some(Role::Usage) => match key {
                b"prompt_tokens" => Slot::UsageCount(0),
                b"completion_tokens" => Slot::UsageCount(1),
                _ => Slot::None,
            },
            Some(Role::Node(level)) => {
                if let Some(i) = NODE_KEYS.iter().position(|k| *k == key) {
                    Slot::NodeCount(level, i as u8)
                } else if DETAIL_KEYS.contains(&key) {
                    Slot::Detail(level)
                } else {
                    Slot::None
                }
            }
            _ => Slot::None,
        }
    }

    /// The first byte of a value; false if no value begins so.
    fn begin_value(&mut self, b: u8) -> bool {
        let slot = self.value_slot();
        // A key given again counts by its last value, whatever that is.
        match slot {
            Slot::Usage => self.usage = [None; 2],
            Slot::ResponseData => self.flow = None,
            Slot::UsageCount(i) => {
                if let Some(u) = self.usage.get_mut(usize::from(i)) {
                    *u = None;
                }
            }
            Slot::NodeCount(level, i) => {
                if let Some(n) = self.nodes.get_mut(usize::from(level)) {
                    n.present &= !(1 << i);
                }
            }
            _ => {}
        }
        match b {
            b'{' => return self.open(true, slot),
            b'[' => return self.open(false, slot),
            b'"' => {
                self.lex = Lex::Str {
                    key: false,
                    esc: Esc::None,
                }
            }
            b'-' => {
                self.lex = Lex::Num(Num::Minus);
                self.num_slot = slot;
                self.num = None;
            }
            b'0' => {
                self.lex = Lex::Num(Num::Zero);
                self.num_slot = slot;
                self.num = Some(0);
            }
            b'1'..=b'9' => {
                self.lex = Lex::Num(Num::Int);
                self.num_slot = slot;
                self.num = Some(u64::from(b - b'0'));
            }
            b't' => {
                self.lex = Lex::Lit {
                    word: b"true",
                    at: 1,
                }
            }
            b'f' => {
                self.lex = Lex::Lit {
                    word: b"false",
                    at: 1,
                }
            }
            b'n' => {
                self.lex = Lex::Lit {
                    word: b"null",
                    at: 1,
                }
            }
            _ => return false,
        }
        true
    }

    fn open(&mut self, object: bool, slot: Slot) -> bool {
        if self.depth >= MAX_DEPTH {
            return false;
        }
        if slot == Slot::Top {
            self.top_object = Some(object);
        }
        let role = match (slot, object) {
            (Slot::Top, true) => Some(Role::Root),
            (Slot::Top, false) | (Slot::ResponseData, false) => Some(Role::Nodes(0)),
            (Slot::Usage, true) => Some(Role::Usage),
            (Slot::Detail(level), false) if usize::from(level) + 1 < NODE_CAP => {
                Some(Role::Nodes(level + 1))
            }
            (Slot::NodeElem(level), true) => {
                if let Some(n) = self.nodes.get_mut(usize::from(level)) {
                    *n = Node::default();
                }
                Some(Role::Node(level))
            }
            _ => None,
        };
        if let Some(role) = role
            && self.chain == self.depth
            && let Some(r) = self.roles.get_mut(usize::from(self.chain))
        {
            *r = role;
            self.chain += 1;
        }
        if object {
            self.objects |= 1 << self.depth;
        } else {
            self.objects &= !(1 << self.depth);
        }
        self.depth += 1;
        self.expect = if object {
            Expect::KeyOrClose
        } else {
            Expect::ValueOrClose
        };
        true
    }

    /// `}` (object) or `]`: false if it closes nothing of its kind.
    fn close(&mut self, object: bool) -> bool {
        if self.depth == 0 || self.in_object() != object {
            return false;
        }
        if self.chain == self.depth {
            if let Some(Role::Node(level)) = self.parent_role()
                && let Some(u) = self.nodes.get(usize::from(level)).and_then(Node::usage)
            {
                self.flow = Some(self.flow.unwrap_or_default().add(u));
            }
            self.chain -= 1;
        }
        self.depth -= 1;
        self.end_value();
        true
    }

    fn end_value(&mut self) {
        self.expect = if self.depth == 0 {
            Expect::Done
        } else {
            Expect::CommaOrClose
        };
    }

    /// Inside a string: runs of plain bytes are skipped in one scan.
    fn string(&mut self, rest: &[u8], key: bool, mut esc: Esc) -> usize {
        // Only a key in an object with a role is kept.
        let keep = key && self.parent_role().is_some();
        let mut i = 0;
        while let Some(&b) = rest.get(i) {
            match esc {
                Esc::None => {
                    let run = rest
                        .get(i..)
                        .unwrap_or_default()
                        .iter()
                        .position(|&c| c == b'"' || c == b'\\' || c < 0x20);
                    let end = run.map_or(rest.len(), |r| i + r);
                    if keep {
                        self.push_key(rest.get(i..end).unwrap_or_default());
                    }
                    i = end;
                    match rest.get(i) {
                        None => break,
                        Some(b'"') => {
                            self.lex = Lex::None;
                            if key {
                                self.expect = Expect::Colon;
                            } else {
                                self.end_value();
                            }
                            return i + 1;
                        }
                        Some(b'\\') => esc = Esc::Backslash,
                        Some(_) => return self.fail(),
                    }
                }
                Esc::Backslash => {
                    let decoded = match b {
                        b'"' | b'\\' | b'/' => b,
                        b'b' => 0x08,
                        b'f' => 0x0c,
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'u' => {
                            esc = Esc::Hex { n: 0, value: 0 };
                            i += 1;
                            continue;
                        }
                        _ => return self.fail(),
                    };
                    if keep {
                        self.push_key(&[decoded]);
                    }
                    esc = Esc::None;
                }
                Esc::Hex { n, value } => {
                    let Some(digit) = (b as char).to_digit(16) else {
                        return self.fail();
                    };
                    let value = value << 4 | digit as u16;
                    esc = if n == 3 {
                        if keep {
                            // Keys of interest are ASCII: anything else matches none.
                            match u8::try_from(value) {
                                Ok(ascii) if ascii < 0x80 => self.push_key(&[ascii]),
                                _ => self.key_len = KEY_CAP + 1,
                            }
                        }
                        Esc::None
                    } else {
                        Esc::Hex { n: n + 1, value }
                    };
                }
            }
            i += 1;
        }
        self.lex = Lex::Str { key, esc };
        i
    }

    fn push_key(&mut self, bytes: &[u8]) {
        let end = self.key_len + bytes.len();
        if let Some(slots) = self.key.get_mut(self.key_len..end) {
            slots.copy_from_slice(bytes);
        }
        self.key_len = end.min(KEY_CAP + 1);
    }

    /// Inside a number: follows its grammar; its value is kept while it is a u64.
    fn number(&mut self, rest: &[u8], mut state: Num) -> usize {
        for (i, &b) in rest.iter().enumerate() {
            let next = match (state, b) {
                (Num::Minus, b'0') => Num::Zero,
                (Num::Minus, b'1'..=b'9') => Num::Int,
                (Num::Int, b'0'..=b'9') => {
                    self.num = self
                        .num
                        .and_then(|n| n.checked_mul(10))
                        .and_then(|n| n.checked_add(u64::from(b - b'0')));
                    Num::Int
                }
                (Num::Zero | Num::Int, b'.') => Num::Dot,
                (Num::Zero | Num::Int | Num::Frac, b'e' | b'E') => Num::Exp,
                (Num::Dot | Num::Frac, b'0'..=b'9') => Num::Frac,
                (Num::Exp, b'+' | b'-') => Num::ExpSign,
                (Num::Exp | Num::ExpSign | Num::ExpDigits, b'0'..=b'9') => Num::ExpDigits,
                (Num::Zero | Num::Int | Num::Frac | Num::ExpDigits, _) => {
                    // The number ended before this byte, which is read again as structure.
                    self.lex = Lex::None;
                    self.number_ended(state);
                    return i;
                }
                _ => return self.fail(),
            };
            if next != Num::Int {
                // Not an integer (or a negative one): no count.
                self.num = None;
            }
            state = next;
        }
        self.lex = Lex::Num(state);
        rest.len()
    }

    fn number_ended(&mut self, state: Num) {
        let value = if matches!(state, Num::Zero | Num::Int) {
            self.num
        } else {
            None
        };
        match (self.num_slot, value) {
            (Slot::UsageCount(i), Some(v)) => {
                if let Some(u) = self.usage.get_mut(usize::from(i)) {
                    *u = Some(v);
                }
            }
            (Slot::NodeCount(level, i), Some(v)) => {
                if let Some(n) = self.nodes.get_mut(usize::from(level))
                    && let Some(c) = n.counts.get_mut(usize::from(i))
                {
                    *c = v;
                    n.present |= 1 << i;
                }
            }
            _ => {}
        }
        self.num_slot = Slot::None;
        self.end_value();
    }

    fn literal(&mut self, rest: &[u8], word: &'static [u8], at: u8) -> usize {
        let mut at = usize::from(at);
        let mut i = 0;
        while let (Some(&want), Some(&b)) = (word.get(at), rest.get(i)) {
            if want != b {
                return self.fail();
            }
            at += 1;
            i += 1;
        }
        if at == word.len() {
            self.lex = Lex::None;
            self.end_value();
        } else {
            self.lex = Lex::Lit { word, at: at as u8 };
        }
        i
    }
}
