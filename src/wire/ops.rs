//! The op table: every op of protocol version 1, once, with its name on
//! the wire and who may call it. `help` lists it, `api::dispatch` matches on
//! it (exhaustively: an op without a handler does not compile), and a test
//! checks protocol.md's tables against it.

/// Protocol version spoken by this server.
pub const PROTOCOL_VERSION: u32 = 1;

/// A role: what a logged-in user or a service key may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Everything.
    Admin,
    /// Accounts, transfers, mints, holds, redeem decisions; not users or keys.
    Operator,
    /// Read-only: balances, accounts, history, transfers, lists, audit, stats, redeems.
    Auditor,
    /// A person with accounts of their own: the campus rules apply.
    User,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Admin, Role::Operator, Role::Auditor, Role::User];

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Auditor => "auditor",
            Role::User => "user",
        }
    }

    /// The role named `s`, if there is one.
    #[must_use]
    pub fn from_name(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// A stored role name; anything unknown is the least privileged.
    #[must_use]
    pub fn parse(s: &str) -> Role {
        Role::from_name(s).unwrap_or(Role::User)
    }

    /// Staff (admin, operator, auditor) see every account, own none, and
    /// are not bound by the campus rules.
    #[must_use]
    pub fn is_staff(self) -> bool {
        self != Role::User
    }
}

/// Who may call an op: anyone (also before logging in), or the logged-in
/// callers with one of some roles. Finer rules (own accounts, the
/// session's user, a key's accounts) are the handler's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Anyone,
    Roles(u8),
}

impl Access {
    /// Whether a caller with `role` passes (`None`: not logged in).
    #[must_use]
    pub fn allows(self, role: Option<Role>) -> bool {
        match (self, role) {
            (Access::Anyone, _) => true,
            (Access::Roles(bits), Some(r)) => bits & r.bit_const() != 0,
            (Access::Roles(_), None) => false,
        }
    }
}

macro_rules! access {
    (Anyone) => {
        Access::Anyone
    };
    ([$($role:ident),+]) => {
        Access::Roles(0 $(| Role::$role.bit_const())+)
    };
}

impl Role {
    const fn bit_const(self) -> u8 {
        match self {
            Role::Admin => 1,
            Role::Operator => 2,
            Role::Auditor => 4,
            Role::User => 8,
        }
    }
}

macro_rules! ops {
    ($($(#[$doc:meta])* $op:ident = $name:literal, $who:tt;)*) => {
        /// An op of the protocol.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Op {
            $($(#[$doc])* $op,)*
        }

        impl Op {
            /// Every op, in the order `help` lists them.
            pub const ALL: &'static [Op] = &[$(Op::$op),*];
            /// Every op's name, in the same order.
            pub const NAMES: &'static [&'static str] = &[$($name),*];

            /// The op's name on the wire.
            #[must_use]
            pub fn name(self) -> &'static str {
                match self {
                    $(Op::$op => $name,)*
                }
            }

            /// Who may call it.
            #[must_use]
            pub fn access(self) -> Access {
                match self {
                    $(Op::$op => access!($who),)*
                }
            }

            /// The op named `name`, if there is one.
            #[must_use]
            pub fn parse(name: &str) -> Option<Op> {
                match name {
                    $($name => Some(Op::$op),)*
                    _ => None,
                }
            }
        }
    };
}

ops! {
    Hello = "hello", Anyone;
    Ping = "ping", Anyone;
    /// Whether the journal can commit.
    Health = "health", Anyone;
    Help = "help", Anyone;
    Signup = "signup", Anyone;
    Login = "login", Anyone;
    /// A token or a service key.
    Auth = "auth", Anyone;
    Whoami = "whoami", [Admin, Operator, Auditor, User];
    Logout = "logout", [Admin, Operator, Auditor, User];
    ChangePassword = "change_password", [Admin, Operator, Auditor, User];
    /// Anyone may ask; the code goes to the user's address.
    ResetPassword = "reset_password", Anyone;
    /// The session's user; a reset: whoever holds the code.
    Confirm = "confirm", Anyone;
    Resend = "resend", Anyone;
    Balance = "balance", [Admin, Operator, Auditor, User];
    Account = "account", [Admin, Operator, Auditor, User];
    Transfer = "transfer", [Admin, Operator, User];
    /// Up to `limits.batch_max` transfers; `atomic`: all or none.
    TransferBatch = "transfer_batch", [Admin, Operator, User];
    Mint = "mint", [Admin, Operator];
    CreateAccount = "create_account", [Admin, Operator];
    History = "history", [Admin, Operator, Auditor, User];
    GetTransfer = "get_transfer", [Admin, Operator, Auditor, User];
    Add = "add", [Admin, Operator];
    DeleteAccount = "delete_account", [Admin, Operator];
    DeleteReason = "delete_reason", [Admin, Operator, Auditor];
    ListAccounts = "list_accounts", [Admin, Operator, Auditor];
    Tag = "tag", [Admin, Operator];
    BulkAdd = "bulk_add", [Admin, Operator];
    Reap = "reap", [Admin, Operator];
    Backup = "backup", [Admin];
    SetEvents = "set_events", [Admin];
    Hold = "hold", [Admin, Operator, User];
    Post = "post", [Admin, Operator, User];
    Void = "void", [Admin, Operator, User];
    /// A user's own request, confirmed by a mailed code.
    Redeem = "redeem", [User];
    Redeems = "redeems", [Admin, Operator, Auditor];
    MyRedeems = "my_redeems", [Admin, Operator, Auditor, User];
    DecideRedeem = "decide_redeem", [Admin, Operator];
    Audit = "audit", [Admin, Operator, Auditor];
    Stats = "stats", [Admin, Operator, Auditor];
    /// A service key: `{key_id, secret}`, the secret shown once.
    CreateKey = "create_key", [Admin];
    ListKeys = "list_keys", [Admin];
    RevokeKey = "revoke_key", [Admin];
    /// A user with a role, made by an admin.
    CreateUser = "create_user", [Admin];
    /// A cluster's membership: a member joins (first as a learner that
    /// catches up, then as a voter), or leaves.
    AddNode = "add_node", [Admin];
    RemoveNode = "remove_node", [Admin];
}

impl Op {
    /// Whether the op is a debit the connection's reader batches per shard
    /// (see `shard::Outbox`): other ops first send what it holds.
    #[must_use]
    pub fn is_batched_debit(self) -> bool {
        matches!(self, Op::Transfer | Op::Mint)
    }

    /// Whether the op only reads the ledger: in a cluster, the leader
    /// answers it once the read index confirms it still leads
    /// (`cluster::read_index`). `audit` is left out: every member answers
    /// it from its own copy.
    #[must_use]
    pub fn reads_ledger(self) -> bool {
        matches!(
            self,
            Op::Balance
                | Op::Account
                | Op::History
                | Op::GetTransfer
                | Op::DeleteReason
                | Op::ListAccounts
                | Op::Redeems
                | Op::MyRedeems
                | Op::Stats
                | Op::ListKeys
        )
    }

    /// How many items a reply to this op may hold at most, for the reply
    /// slots it takes (`limit`: the page asked for, if any).
    #[must_use]
    pub fn page_items(self, limit: Option<u64>) -> Option<usize> {
        use crate::limits::{PAGE_LIMIT_DEFAULT, PAGE_LIMIT_MAX};
        let asked =
            || limit.map_or(PAGE_LIMIT_DEFAULT, |l| usize::try_from(l).unwrap_or(PAGE_LIMIT_MAX).min(PAGE_LIMIT_MAX));
        match self {
            Op::History | Op::ListAccounts | Op::Redeems | Op::ListKeys => Some(asked()),
            Op::MyRedeems => Some(PAGE_LIMIT_MAX),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_and_are_unique() {
        for op in Op::ALL {
            assert_eq!(Op::parse(op.name()), Some(*op));
        }
        let mut names = Op::NAMES.to_vec();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Op::ALL.len());
        assert_eq!(Op::parse("no_such_op"), None);
    }

    /// protocol.md's authorization matrix says who may call each op; it
    /// must say what the table here says, and list every op once.
    #[test]
    fn protocol_md_authorization_matrix_matches_the_table() {
        let doc = include_str!("../../protocol.md");
        let matrix = doc.split("## Authorization").nth(1).expect("an Authorization section");
        let mut seen = Vec::new();
        let mut columns: Vec<Option<Role>> = Vec::new();
        for line in matrix.lines().take_while(|l| !l.starts_with("## ")) {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            if cells.get(1) == Some(&"op") {
                columns = cells[2..cells.len() - 1].iter().map(|c| Role::from_name(c)).collect();
                continue;
            }
            if cells.len() < 3 || !cells[1].starts_with('`') {
                continue;
            }
            for name in cells[1].split(", ") {
                let name = name.trim_matches('`');
                let op = Op::parse(name).unwrap_or_else(|| panic!("protocol.md lists an unknown op {name}"));
                for (role, cell) in columns.iter().zip(&cells[2..]) {
                    // A cell that is an error code refuses the caller.
                    let refused = cell.starts_with('`');
                    assert_eq!(!refused, op.access().allows(*role), "protocol.md: {name} for {role:?} says {cell:?}");
                }
                seen.push(op);
            }
        }
        assert_eq!(columns, [None, Some(Role::User), Some(Role::Auditor), Some(Role::Operator), Some(Role::Admin)]);
        for op in Op::ALL {
            assert_eq!(seen.iter().filter(|o| *o == op).count(), 1, "protocol.md lists {} once", op.name());
        }
    }
}
