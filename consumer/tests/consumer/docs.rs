//! The commands the README and docs/ show: every `feeder` and `consumer` command is one the
//! binaries take (parsed by their own clap definitions), every script and example they name
//! exists, and the quick start of docs/running-on-aws.md runs, command by command, against the
//! local services. A page that drifts from the code fails here. (`scripts/test` is what CI
//! runs, and it runs `scripts/demo`.)

use std::path::{Path, PathBuf};

use clap::CommandFactory;
use testkit::Env;

/// A command as a page shows it.
#[derive(Debug, Clone)]
struct Shown {
    /// `docs/x.md:12`.
    place: String,
    words: Vec<String>,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The README and every page under docs/ but the settings reference (the binaries' own help,
/// checked by `reference`).
fn pages() -> Vec<(String, String)> {
    let mut names = vec!["README.md".to_owned()];
    let mut docs: Vec<String> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".md") && n != "settings.md")
        .map(|n| format!("docs/{n}"))
        .collect();
    docs.sort();
    names.extend(docs);
    names.into_iter().map(|n| (std::fs::read_to_string(root().join(&n)).unwrap(), n)).map(|(t, n)| (n, t)).collect()
}

/// The lines of shell blocks, and the inline code spans that start like a command.
fn shown() -> Vec<Shown> {
    let mut out = Vec::new();
    for (page, text) in pages() {
        let mut in_shell = None;
        for (n, line) in text.lines().enumerate() {
            let place = format!("{page}:{}", n + 1);
            if let Some(fence) = line.trim_start().strip_prefix("```") {
                in_shell = match in_shell {
                    None => Some(matches!(fence.trim(), "sh" | "bash" | "shell")),
                    Some(_) => None,
                };
                continue;
            }
            match in_shell {
                Some(true) => {
                    let command = line.split(" #").next().unwrap_or_default().trim();
                    if !command.is_empty() && !command.starts_with('#') {
                        out.push(Shown { place, words: words(command) });
                    }
                }
                Some(false) => {}
                None => {
                    for span in line.split('`').skip(1).step_by(2) {
                        let first = span.split_whitespace().next().unwrap_or_default();
                        // `feeder <command>` stands for any command: not one to check.
                        let command = matches!(first, "feeder" | "consumer") && span.contains(' ');
                        if (command || first.starts_with("scripts/")) && !span.contains('<') {
                            out.push(Shown { place: place.clone(), words: words(span) });
                        }
                    }
                }
            }
        }
    }
    out
}

/// A command's words: its environment assignments and what follows a redirection or a pipe
/// left out, optional parts (`[--json]`) taken, and the placeholders a page writes (`N`, `R`,
/// `…`) given a value.
fn words(command: &str) -> Vec<String> {
    command
        .split_whitespace()
        .skip_while(|w| w.contains('=') && !w.starts_with('-'))
        .take_while(|w| !matches!(*w, ">" | ">>" | "|" | "&&" | ";" | "2>" | "2>&1"))
        .map(|w| w.trim_start_matches('[').trim_end_matches(']'))
        .map(|w| match w {
            "N" | "K" | "S" | "C" => "5".to_owned(),
            "R" => "source_missing".to_owned(),
            w => w.replace('…', "x"),
        })
        .collect()
}

/// The binary a command runs (`feeder`, `target/release/consumer`, …), if it is one of ours.
fn ours(words: &[String]) -> Option<&'static str> {
    match words.first()?.rsplit('/').next()? {
        "feeder" => Some("feeder"),
        "consumer" => Some("consumer"),
        _ => None,
    }
}

/// Whether a script takes the arguments a page gives it: `scripts/bench` and `scripts/faults`
/// parse them with their binaries' own definitions (`testkit::cli`), after the options the
/// scripts themselves read; `scripts/local-services` takes one of its commands.
fn script_takes(words: &[String]) -> Result<(), String> {
    use clap::Parser;
    let (script, args) = words.split_first().expect("a command has a first word");
    match script.as_str() {
        "scripts/bench" => {
            // `--servers` is the script's; it passes `--server` lines of its own.
            let mut argv = vec!["bench".to_owned(), "--server".to_owned(), "s,http://s3,http://sqs".to_owned()];
            let mut rest = args.iter();
            while let Some(arg) = rest.next() {
                match arg.as_str() {
                    "--servers" => {
                        let servers = rest.next().ok_or("--servers wants a value")?;
                        if let Some(unknown) = servers.split(',').find(|s| !matches!(*s, "ministack" | "seaweedfs")) {
                            return Err(format!("no server {unknown} (ministack, seaweedfs)"));
                        }
                    }
                    _ => argv.push(arg.clone()),
                }
            }
            let parsed = testkit::cli::BenchArgs::try_parse_from(argv).map_err(|e| e.kind().to_string())?;
            parsed.config().map(drop).map_err(|e| e.to_string())
        }
        "scripts/faults" => {
            let mut argv = vec!["faults".to_owned()];
            for arg in args {
                match arg.as_str() {
                    "--quick" => argv.extend(["--objects", "600"].map(str::to_owned)),
                    _ => argv.push(arg.clone()),
                }
            }
            testkit::cli::FaultsArgs::try_parse_from(argv).map(drop).map_err(|e| e.kind().to_string())
        }
        "scripts/local-services" => match args.first().map(String::as_str) {
            None | Some("up" | "down" | "env" | "status" | "forget-test-databases") => Ok(()),
            Some(other) => Err(format!("scripts/local-services has no command {other}")),
        },
        _ => Ok(()),
    }
}

#[test]
fn every_command_the_docs_show_is_one_the_binaries_take() {
    let shown = shown();
    let mut checked = 0;
    let mut wrong = Vec::new();
    for Shown { place, words } in &shown {
        if let Some(program) = ours(words) {
            let command = match program {
                "feeder" => feeder::Settings::command(),
                _ => consumer::Settings::command(),
            };
            // The settings every command needs come from the environment where it runs.
            let command = command.mut_args(|a| a.required(false));
            match command.try_get_matches_from(words) {
                Ok(_) => {}
                Err(e) if matches!(e.kind(), clap::error::ErrorKind::DisplayHelp) => {}
                Err(e) => wrong.push(format!("{place}: `{}`: {}", words.join(" "), e.kind())),
            }
            checked += 1;
        } else if let Some(script) = words.first().filter(|w| w.starts_with("scripts/")) {
            let path = root().join(script);
            let executable = std::fs::metadata(&path).is_ok_and(|m| {
                use std::os::unix::fs::PermissionsExt;
                m.permissions().mode() & 0o111 != 0
            });
            if !executable {
                wrong.push(format!("{place}: `{script}` is not an executable script of the repository"));
            }
            if let Err(e) = script_takes(words) {
                wrong.push(format!("{place}: `{}`: {e}", words.join(" ")));
            }
            checked += 1;
        } else if let Some(at) = words.iter().position(|w| w == "--example") {
            let (crate_dir, example) = (&words[words.iter().position(|w| w == "-p").unwrap() + 1], &words[at + 1]);
            if !root().join(crate_dir).join("examples").join(format!("{example}.rs")).exists() {
                wrong.push(format!("{place}: no example {example} in {crate_dir}"));
            }
            checked += 1;
        }
    }
    assert!(wrong.is_empty(), "commands the docs show that the code does not take:\n{}", wrong.join("\n"));
    assert!(checked >= 40, "only {checked} commands found: is the scan still reading the pages?");
}

#[test]
fn the_scan_reads_placeholders_and_skips_what_is_not_a_command() {
    assert_eq!(words("FOO=1 scripts/bench --objects N"), ["scripts/bench", "--objects", "5"]);
    assert_eq!(words("feeder failures --reason R"), ["feeder", "failures", "--reason", "source_missing"]);
    assert_eq!(ours(&words("target/release/feeder status")), Some("feeder"));
    assert_eq!(ours(&words("psql -f deploy/database-role.sql")), None);
    assert_eq!(words("feeder report --csv > moved.csv"), ["feeder", "report", "--csv"]);
    assert_eq!(words("feeder fence status [--json]"), ["feeder", "fence", "status", "--json"]);
}

/// The quick start (docs/running-on-aws.md, "Running the binaries"), with the binaries this
/// build made and the settings of a test environment instead of `.env`: each command exits 0,
/// and the migration is done at the end.
#[tokio::test]
async fn the_quick_start_runs_command_by_command() {
    let env = Env::new().await;
    let (keys, _) = env.seed_legacy(0..30).await;
    let quick_start: Vec<Shown> = shown()
        .into_iter()
        .filter(|s| s.place.starts_with("docs/running-on-aws.md:") && ours(&s.words).is_some())
        .take_while(|s| s.words[0].starts_with("target/release/"))
        .collect();
    assert!(quick_start.len() >= 10, "{quick_start:?}");
    for Shown { place, words } in &quick_start {
        let program = ours(words).unwrap();
        let mut command = env.command(program);
        command.env("RUST_LOG", "warn").args(&words[1..]);
        if program == "consumer" {
            // Drains and exits, where the page's runs until SIGTERM.
            command.env("EXIT_WHEN_IDLE", "2");
        }
        let out = command.output().unwrap();
        assert!(
            out.status.success(),
            "{place}: `{}` exited {:?}\n{}",
            words.join(" "),
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(env.count_rows_with_prefix("avatar/").await, keys.len() as i64, "every row moved");
}
