//! `sluice-stripe-emulator`: the test kit's Stripe emulator as a program, to try a Stripe sync
//! on a laptop, or to drive one from a script, without a Stripe account.
//!
//! ```text
//! sluice-stripe-emulator --port 12111 --key sk_test_local
//! curl -u sk_test_local: localhost:12111/v1/customers -d email=a@example.com
//! ```
//! Then point a sync at it with `api_base = "http://127.0.0.1:12111"`.

use clap::Parser;

/// A local Stripe stand-in: objects, lists, events, keys, connected accounts.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// The port to listen on (loopback only).
    #[arg(long, default_value_t = 12111)]
    port: u16,
    /// The API key clients must send (as a bearer token or basic-auth user).
    #[arg(long, default_value = "sk_test_local")]
    key: String,
    /// Customers to create at start, for a quick try.
    #[arg(long, default_value_t = 0)]
    seed_customers: usize,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let stripe = sluice_stripe_emulator::Emulator::start_on(args.port, &args.key)
        .await
        .unwrap_or_else(|e| {
            eprintln!("error: cannot listen on 127.0.0.1:{}: {e}", args.port);
            std::process::exit(1);
        });
    for i in 0..args.seed_customers {
        stripe.create(
            "customers",
            &[("email", &format!("customer{i}@example.com"))],
        );
    }
    eprintln!(
        "Stripe emulator at {} (key {}…); {} customers; Ctrl-C stops it",
        stripe.url(),
        args.key.get(..8).unwrap_or(""),
        args.seed_customers
    );
    let _ = tokio::signal::ctrl_c().await;
}
