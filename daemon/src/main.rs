fn main() -> std::process::ExitCode {
    replited::cli::main()
}
