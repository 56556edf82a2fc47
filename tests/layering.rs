//! Dependencies point one way: the README's layout section holds, as a table, which of the
//! crate's modules each module uses; this test reads that table and every source file, and
//! fails on a use the table does not list (a new edge, a cycle) and on a listed use that the
//! code no longer makes (a table that drifted from the code). Also: nothing below main.rs
//! knows clap.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The table under the README's "### Dependencies" heading: `| module | uses |` rows, the uses
/// separated by commas or spaces ("-" for none).
fn table(readme: &str) -> BTreeMap<String, BTreeSet<String>> {
    let section = readme
        .split("### Dependencies")
        .nth(1)
        .expect("README.md has a `### Dependencies` section");
    let mut rows = BTreeMap::new();
    for line in section.lines().skip_while(|l| !l.starts_with('|')) {
        if !line.starts_with('|') {
            break;
        }
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        let [module, uses] = cells[..] else {
            panic!("a dependency row needs two cells: {line}");
        };
        if module == "module" || module.starts_with("---") {
            continue;
        }
        let uses = uses
            .split([',', ' '])
            .map(|u| u.trim_matches('`'))
            .filter(|u| !u.is_empty() && *u != "-")
            .map(str::to_owned)
            .collect();
        assert!(
            rows.insert(module.trim_matches('`').to_owned(), uses)
                .is_none(),
            "{module} is listed twice"
        );
    }
    rows
}

/// The crate's top-level modules: the folders and files of src/ but main.rs and lib.rs.
fn modules(src: &Path) -> BTreeSet<String> {
    std::fs::read_dir(src)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let path = e.path();
            let name = path.file_stem()?.to_str()?.to_owned();
            let module = path.is_dir() || path.extension().is_some_and(|x| x == "rs");
            (module && name != "main" && name != "lib").then_some(name)
        })
        .collect()
}

fn rust_files(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_dir() {
        for entry in std::fs::read_dir(path).unwrap().flatten() {
            rust_files(&entry.path(), out);
        }
    } else if path.extension().is_some_and(|x| x == "rs") {
        out.push(path.to_owned());
    }
}

/// Source text without comments (a doc comment may name any module).
fn code(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(at) if !l[..at].contains('"') => &l[..at],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The crate modules a source text names: every `crate::name`, and the first segment of each
/// item of a `crate::{...}` group.
fn used(text: &str) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = BTreeSet::new();
    for (at, _) in text.match_indices("crate::") {
        let rest = &text[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Items at depth 0 of the group: `a`, `b::c`, `d::{e, f}`.
            let (mut depth, mut item) = (0, String::new());
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.insert(ident(item.trim()));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                if depth == 0 {
                    item.push(c);
                }
            }
            out.insert(ident(item.trim()));
        } else {
            out.insert(ident(rest));
        }
    }
    out.remove("");
    out
}

#[test]
fn every_module_uses_what_the_readme_lists_and_nothing_else() {
    let readme = std::fs::read_to_string(Path::new(ROOT).join("README.md")).unwrap();
    let allowed = table(&readme);
    let src = Path::new(ROOT).join("src");
    let found = modules(&src);
    let listed: BTreeSet<String> = allowed.keys().cloned().collect();
    assert_eq!(
        listed, found,
        "the README's dependency table and src/ list different modules"
    );
    let mut wrong = Vec::new();
    for module in &found {
        let mut files = Vec::new();
        let dir = src.join(module);
        rust_files(
            &if dir.is_dir() {
                dir
            } else {
                src.join(format!("{module}.rs"))
            },
            &mut files,
        );
        let mut uses = BTreeSet::new();
        for file in &files {
            let text = code(&std::fs::read_to_string(file).unwrap());
            for dep in used(&text) {
                if dep != *module && !allowed[module].contains(&dep) {
                    wrong.push(format!(
                        "{} uses `{dep}`, which the table does not list for `{module}`",
                        file.strip_prefix(ROOT).unwrap().display()
                    ));
                }
                uses.insert(dep);
            }
        }
        for dep in &allowed[module] {
            if !uses.contains(dep) {
                wrong.push(format!(
                    "the table lists `{dep}` for `{module}`, which uses it nowhere"
                ));
            }
            if !found.contains(dep) {
                wrong.push(format!("the table names `{dep}`, not a module of src/"));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn nothing_below_main_knows_clap() {
    let mut files = Vec::new();
    rust_files(&Path::new(ROOT).join("src"), &mut files);
    let knows: Vec<String> = files
        .iter()
        .filter(|f| !f.ends_with("src/main.rs"))
        .filter(|f| code(&std::fs::read_to_string(f).unwrap()).contains("clap"))
        .map(|f| f.display().to_string())
        .collect();
    assert!(knows.is_empty(), "clap outside main.rs: {knows:?}");
}

#[test]
fn the_scanner_sees_plain_paths_groups_and_nested_groups() {
    let text =
        "use crate::a::B;\nuse crate::{c, d::E, f::{g, h}};\nlet x = crate::i::j();\n// crate::k\n";
    let want: BTreeSet<String> = ["a", "c", "d", "f", "i"].map(String::from).into();
    assert_eq!(used(&code(text)), want);
}
