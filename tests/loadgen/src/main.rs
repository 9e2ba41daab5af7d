fn main() -> std::process::ExitCode {
    novacron_loadgen::cli::main()
}
