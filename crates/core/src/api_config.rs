//! Settings of the API sources (`provider = "stripe"`), part of the configuration types
//! ([`crate::Config`]).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::SecretSource;

/// A Stripe sync's settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StripeSourceConfig {
    /// The secret key (`sk_…`) or, better, a restricted key (`rk_…`) with read access to
    /// the chosen objects and to events; read from an environment variable or a file.
    pub key: SecretSource,
    /// The objects to sync, by Stripe object name (`customer`, `invoiceitem`) or collection
    /// id (`stripe:customer`). Default: every object sluice knows (docs/stripe.md).
    #[serde(default)]
    pub collections: Option<Vec<String>>,
    /// Connected accounts to sync as well (the `Stripe-Account` header): a list of
    /// account ids, or `"all"` to sync every connected account and follow new ones. Each
    /// account is its own sync id, derived from this sync's id and the account id.
    #[serde(default)]
    pub accounts: Option<AccountsConfig>,
    /// Whether to sync the platform account's own objects (default true).
    #[serde(default = "default_true")]
    pub platform: bool,
    /// How often to ask for new events, in milliseconds (default 1000).
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// Requests per second this key may make (default: Stripe's documented limit, 25 for
    /// test-mode keys and 100 for live keys). Never exceeded in any one-second window.
    #[serde(default)]
    pub rate_limit: Option<f64>,
    /// Requests in flight at once (default 4).
    #[serde(default = "default_api_concurrency")]
    pub concurrency: usize,
    /// How long one request may take, in milliseconds (default 30000).
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// The Stripe API version sluice asks for (`Stripe-Version`); an event rendered at
    /// another version is fetched again. Default: the version sluice's schemas describe.
    #[serde(default)]
    pub api_version: Option<String>,
    /// The API's base URL (default `https://api.stripe.com`); for emulators.
    #[serde(default)]
    pub api_base: Option<String>,
    /// With `accounts = "all"`, how often to look for new connected accounts, in
    /// seconds (default 60).
    #[serde(default = "default_discover_interval_s")]
    pub discover_interval_s: u64,
}

/// The Stripe objects a Stripe sync can follow, by object name; collection ids are
/// `stripe:<name>`.
pub const STRIPE_OBJECTS: [&str; 14] = [
    "customer",
    "product",
    "price",
    "subscription",
    "invoice",
    "invoiceitem",
    "charge",
    "payment_intent",
    "refund",
    "balance_transaction",
    "dispute",
    "payout",
    "coupon",
    "plan",
];

/// The connected accounts of an API source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum AccountsConfig {
    /// Every connected account, including ones connected later.
    All(AllAccounts),
    /// These accounts (`acct_…`).
    Listed(Vec<String>),
}

/// `"all"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AllAccounts {
    /// Every connected account.
    All,
}

fn default_true() -> bool {
    true
}
fn default_poll_interval_ms() -> u64 {
    1000
}
fn default_api_concurrency() -> usize {
    4
}
fn default_request_timeout_ms() -> u64 {
    30_000
}
fn default_discover_interval_s() -> u64 {
    60
}
