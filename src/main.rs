//! The `jumplens` command line (see [`jumplens::cli`]).

fn main() -> std::process::ExitCode {
    jumplens::interrupt::install();
    jumplens::cli::main()
}
