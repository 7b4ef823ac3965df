//! Writing to stdout the way a command-line tool should: a closed pipe (`sluice status --json |
//! head -1`) ends the process quietly, with the status a shell expects of a process stopped by
//! SIGPIPE (141), instead of the panic `println!` gives. The macros (`say!`, `sayln!`) are in
//! scope in every module of the binary (`#[macro_use]`).

use std::io::Write;

/// Writes `text` to stdout; on a closed pipe, exits at once and quietly.
pub fn write(text: std::fmt::Arguments<'_>) {
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_fmt(text).and_then(|()| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(141);
        }
        eprintln!("error: cannot write to stdout: {e}");
        std::process::exit(1);
    }
}

/// `print!` that exits quietly on a closed pipe.
macro_rules! say {
    ($($arg:tt)*) => { $crate::out::write(format_args!($($arg)*)) };
}

/// `println!` that exits quietly on a closed pipe.
macro_rules! sayln {
    () => { $crate::out::write(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::out::write(format_args!("{}\n", format_args!($($arg)*))) };
}
