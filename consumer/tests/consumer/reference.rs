//! `docs/settings.md`, the settings reference, is the binaries' own `--help`: this test fails
//! when the two drift apart, and `UPDATE_DOCS=1` writes the file from the code.

use clap::CommandFactory;

/// The reference: each command's long help, subcommands after their parent.
fn reference() -> String {
    let mut out = String::from(
        "# Settings reference\n\n\
         Every setting is a flag and an environment variable of the same name (in brackets); a `.env`\n\
         file in the working directory is read first. This page is the binaries' own `--help`,\n\
         generated from the code: a test fails when they drift apart, and\n\
         `UPDATE_DOCS=1 cargo nextest run -p consumer reference` writes it again.\n",
    );
    for command in [feeder::Settings::command(), consumer::Settings::command()] {
        add(&mut out, command, "");
    }
    out
}

fn add(out: &mut String, command: clap::Command, parent: &str) {
    // The values of variables set where the test runs are not the reference's.
    let mut command = command.mut_args(|a| a.hide_env_values(true));
    let name = format!("{parent}{}", command.get_name());
    let level = if parent.is_empty() { "##" } else { "###" };
    let help = command.render_long_help().to_string();
    let help: Vec<&str> = help.lines().map(str::trim_end).collect();
    out.push_str(&format!("\n{level} `{name}`\n\n```text\n{}\n```\n", help.join("\n").trim_end()));
    let subcommands: Vec<clap::Command> =
        command.get_subcommands().filter(|s| s.get_name() != "help").cloned().collect();
    for sub in subcommands {
        add(out, sub, &format!("{name} "));
    }
}

#[test]
fn the_settings_reference_is_the_binaries_help() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/settings.md");
    let expected = reference();
    if std::env::var_os("UPDATE_DOCS").is_some() {
        std::fs::write(path, &expected).unwrap();
    }
    let written = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        written == expected,
        "docs/settings.md differs from the binaries' --help: run UPDATE_DOCS=1 cargo nextest run -p consumer reference"
    );
}
