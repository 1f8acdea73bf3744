//! The `roony` binary: parses the command line and hands over to `roony::cli`.

fn main() -> std::process::ExitCode {
    roony::cli::main()
}
