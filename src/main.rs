//! The `datastore` binary: parses the command line and runs it (see `datastore::cli`).

fn main() -> std::process::ExitCode {
    datastore::cli::main()
}
