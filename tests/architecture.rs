//! The shape of `src/`, checked: the modules depend on each other one way (no cycle between
//! sibling modules, at any depth), and no file grows past what one concept needs.
//!
//! The graph comes from the code's own paths (`use crate::…`, `use super::…`, `crate::x::y`
//! in expressions), comments and `#[cfg(test)]` modules left out (a test may reach anywhere).
//! A path to an item a module re-exports (`pub use tracker::Drain` in `drain/mod.rs`) is
//! followed to the module that defines it, so a re-export cannot hide an edge.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module's path from the crate root: `["drain", "http", "server"]`.
type ModulePath = Vec<String>;

/// The longest a file of `src/` may be, its tests included.
const MAX_LINES: usize = 600;

#[test]
fn no_cycle_between_sibling_modules() {
    let crate_src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let modules = Modules::read(&crate_src);
    let edges = modules.sibling_edges();
    let cycles: Vec<String> = edges
        .iter()
        .flat_map(|(parent, graph)| find_cycles(graph).into_iter().map(|cycle| describe(parent, &cycle)))
        .collect();
    assert!(
        cycles.is_empty(),
        "modules that depend on each other (each arrow: the first uses the second):\n{}",
        cycles.join("\n")
    );
    // The check sees edges at all: the top level has the layers it is built on.
    let top = &edges[&Vec::new()];
    assert!(
        top.get("drain").is_some_and(|to| to.contains("lifecycle")),
        "the drain uses the lifecycle"
    );
    assert!(
        top.get("lifecycle").is_some_and(|to| to.contains("wire")),
        "the lifecycle uses the wire protocol"
    );
}

#[test]
fn no_file_of_src_is_longer_than_one_concept_needs() {
    let crate_src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let long: Vec<String> = rust_files(&crate_src)
        .into_iter()
        .filter_map(|file| {
            let lines = std::fs::read_to_string(&file).unwrap().lines().count();
            (lines > MAX_LINES).then(|| format!("{} ({lines} lines)", file.display()))
        })
        .collect();
    assert!(long.is_empty(), "files over {MAX_LINES} lines: {long:?}");
}

fn describe(parent: &ModulePath, cycle: &[(String, String)]) -> String {
    let prefix = if parent.is_empty() {
        "crate".to_owned()
    } else {
        parent.join("::")
    };
    let arrows: Vec<String> = cycle.iter().map(|(from, to)| format!("{from} -> {to}")).collect();
    format!("  in {prefix}: {}", arrows.join(", "))
}

/// The cycles of `graph`: each group of modules that reach one another (a strongly
/// connected component of more than one module), with the edges inside it.
fn find_cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<(String, String)>> {
    let reach = |from: &str| -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.to_owned()];
        while let Some(node) = todo.pop() {
            for next in graph.get(&node).into_iter().flatten() {
                if seen.insert(next.clone()) {
                    todo.push(next.clone());
                }
            }
        }
        seen
    };
    let reaches: BTreeMap<&String, BTreeSet<String>> = graph.keys().map(|node| (node, reach(node))).collect();
    let mut grouped = BTreeSet::new();
    let mut cycles = Vec::new();
    for node in graph.keys() {
        if grouped.contains(node) || !reaches[node].contains(node) {
            continue;
        }
        let group: BTreeSet<&String> = reaches[node]
            .iter()
            .filter_map(|other| graph.get_key_value(other).map(|(k, _)| k))
            .filter(|other| reaches[other].contains(node))
            .collect();
        let edges = group
            .iter()
            .flat_map(|from| {
                graph[*from]
                    .iter()
                    .filter(|to| group.contains(to))
                    .map(|to| ((*from).clone(), to.clone()))
            })
            .collect();
        grouped.extend(group.into_iter().cloned());
        cycles.push(edges);
    }
    cycles
}

/// The modules of the crate, what each one's code refers to, and what each re-exports.
struct Modules {
    /// Each module's references, as absolute paths (module path, then the item).
    references: BTreeMap<ModulePath, Vec<Vec<String>>>,
    /// `(module, name) → the path the name stands for there` (every `use`, public or not).
    reexports: BTreeMap<(ModulePath, String), Vec<String>>,
}

impl Modules {
    fn read(crate_src: &Path) -> Self {
        let mut modules = Modules {
            references: BTreeMap::new(),
            reexports: BTreeMap::new(),
        };
        for file in rust_files(crate_src) {
            let relative = file.strip_prefix(crate_src).unwrap();
            if relative.starts_with("bin") || relative.file_name().is_some_and(|n| n == "tests.rs") {
                continue;
            }
            let module = module_path(relative);
            let code = without_tests(&without_comments(&std::fs::read_to_string(&file).unwrap()));
            modules.add(module, &code);
        }
        modules
    }

    fn add(&mut self, module: ModulePath, code: &str) {
        let mut references = Vec::new();
        for tree in use_declarations(code) {
            for path in expand(&tree) {
                let absolute = absolute(&module, &path);
                // Every `use` puts a name in the module, which its children can reach with
                // `super::name`: followed like a re-export.
                let name = path.last().cloned().unwrap_or_default();
                if name != "*" && name != "self" && !name.is_empty() {
                    self.reexports.insert((module.clone(), name), absolute.clone());
                }
                references.push(absolute);
            }
        }
        for path in inline_crate_paths(code) {
            references.push(path);
        }
        self.references.entry(module).or_default().extend(references);
    }

    /// The module that defines what `path` names: the deepest known module on it, followed
    /// through the re-exports of the modules it passes.
    fn resolve(&self, path: &[String]) -> ModulePath {
        let mut path = path.to_vec();
        for _ in 0..16 {
            let depth = (0..=path.len())
                .rev()
                .find(|&n| self.references.contains_key(&path[..n]))
                .unwrap_or(0);
            let module = path[..depth].to_vec();
            let Some(name) = path.get(depth) else { return module };
            match self.reexports.get(&(module.clone(), name.clone())) {
                Some(target) if target != &path => {
                    let mut next = target.clone();
                    next.extend(path[depth + 1..].iter().cloned());
                    path = next;
                }
                _ => return module,
            }
        }
        path
    }

    /// For each module with children: which child uses which child.
    fn sibling_edges(&self) -> BTreeMap<ModulePath, BTreeMap<String, BTreeSet<String>>> {
        let mut edges: BTreeMap<ModulePath, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
        for (from, references) in &self.references {
            for reference in references {
                let to = self.resolve(reference);
                let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
                // A module using its own ancestor or descendant is not an edge between siblings.
                if common == from.len() || common == to.len() {
                    continue;
                }
                edges
                    .entry(from[..common].to_vec())
                    .or_default()
                    .entry(from[common].clone())
                    .or_default()
                    .insert(to[common].clone());
            }
        }
        edges
    }
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// `drain/http/mod.rs` → `["drain", "http"]`; `lib.rs` → `[]`.
fn module_path(relative: &Path) -> ModulePath {
    let mut parts: ModulePath = relative
        .with_extension("")
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts
}

/// The code without comments (doc comments included: their links are not dependencies)
/// and without the contents of string literals.
fn without_comments(source: &str) -> String {
    let bytes = source.as_bytes();
    let mut out = String::with_capacity(source.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i..].starts_with(b"//") {
            while i < bytes.len() && bytes[i] != b'\n' {
                i += 1;
            }
        } else if bytes[i..].starts_with(b"/*") {
            let end = source[i + 2..].find("*/").map_or(bytes.len(), |e| i + 2 + e + 2);
            i = end;
        } else if bytes[i] == b'"' && !source[..i].ends_with('\'') {
            i += 1;
            while i < bytes.len() && bytes[i] != b'"' {
                i += if bytes[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else {
            let c = source[i..].chars().next().unwrap();
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// The code without its `#[cfg(test)]` items (a `mod tests { … }` or `mod tests;`).
fn without_tests(code: &str) -> String {
    let mut out = String::new();
    let mut rest = code;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        let end = match (after.find('{'), after.find(';')) {
            (Some(open), Some(semi)) if semi < open => semi + 1,
            (Some(open), _) => open + matching_brace(&after[open..]),
            (None, Some(semi)) => semi + 1,
            (None, None) => after.len(),
        };
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// The length of the block that `code` opens with `{`, braces included.
fn matching_brace(code: &str) -> usize {
    let mut depth = 0;
    for (i, c) in code.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
    }
    code.len()
}

/// Each `use` declaration's tree (`crate::drain::{Drain, Turn}`), whitespace collapsed.
fn use_declarations(code: &str) -> Vec<String> {
    let mut declarations = Vec::new();
    let mut search = 0;
    while let Some(found) = code[search..].find("use ") {
        let at = search + found;
        search = at + 4;
        let before = code[..at].trim_end();
        let starts_item = before.is_empty() || before.ends_with([';', '{', '}', ']', ')']) || before.ends_with("pub");
        if !starts_item || code[..at].ends_with(|c: char| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let Some(end) = code[at..].find(';') else { break };
        let tree = code[at + 4..at + end].split_whitespace().collect::<Vec<_>>().join(" ");
        declarations.push(tree);
        search = at + end;
    }
    declarations
}

/// `a::{b, c::{d, e}}` → `a::b`, `a::c::d`, `a::c::e`, as segments; `x as y` → `x`.
fn expand(tree: &str) -> Vec<Vec<String>> {
    let tree = tree.trim().trim_start_matches("::");
    let segments = |path: &str| -> Vec<String> {
        path.split("::")
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    };
    let Some(open) = tree.find('{') else {
        return vec![segments(tree.split(" as ").next().unwrap())];
    };
    let prefix = segments(&tree[..open]);
    let inner = &tree[open + 1..open + matching_brace(&tree[open..]) - 1];
    let mut paths = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in inner.char_indices().chain([(inner.len(), ',')]) {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                let part = inner[start..i].trim();
                start = i + 1;
                if part.is_empty() {
                    continue;
                }
                for rest in expand(part) {
                    let mut path = prefix.clone();
                    path.extend(rest.into_iter().filter(|s| s != "self"));
                    paths.push(path);
                }
            }
            _ => {}
        }
    }
    paths
}

/// `path` from `module`, as a path from the crate root.
fn absolute(module: &ModulePath, path: &[String]) -> Vec<String> {
    let mut segments = path.iter().peekable();
    let mut base = match segments.peek().map(|s| s.as_str()) {
        Some("crate") => {
            segments.next();
            Vec::new()
        }
        Some("super" | "self") => module.clone(),
        // A child module's item (`use activity::Activity` in a `mod.rs`), or another crate's
        // (which resolves to this module itself: no edge).
        _ => module.clone(),
    };
    while let Some(segment) = segments.peek() {
        match segment.as_str() {
            "super" => {
                base.pop();
            }
            "self" => {}
            _ => break,
        }
        segments.next();
    }
    base.extend(segments.cloned());
    base
}

/// `crate::a::b` paths written in expressions and types, outside `use` declarations.
fn inline_crate_paths(code: &str) -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    let mut search = 0;
    while let Some(found) = code[search..].find("crate::") {
        let at = search + found;
        search = at + 7;
        if code[..at].ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == '(') || code[..at].ends_with("in ") {
            continue; // `pub(crate)`, `in crate::…` visibilities
        }
        let path: String = code[at + 7..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        paths.push(path.split("::").filter(|s| !s.is_empty()).map(str::to_owned).collect());
    }
    paths
}
