//! Dependency closure over Depends + Pre-Depends for one architecture (no backtracking, deterministic).

use std::collections::{BTreeMap, VecDeque};

use anyhow::{anyhow, bail};

use super::packages::{Dep, Package, PackageIndex};

/// Resolves `roots` (`name` or `name=version`) and everything they depend on.
///
/// Rules, chosen to be predictable rather than clever:
/// - for each OR-group, the first alternative already selected wins, else the first satisfiable one;
/// - a real package of the name is preferred over virtual providers; among providers one already
///   selected wins, else the only one, else the first by name (logged);
/// - the highest version satisfying the constraint is taken, and a name is selected only once;
/// - `:any` / `:native` qualifiers are stripped; another architecture's qualifier cannot be met.
///
/// Output is sorted by package name.
pub fn resolve(index: &PackageIndex, roots: &[&str]) -> anyhow::Result<Vec<Package>> {
    let mut r = Resolver { index, selected: BTreeMap::new(), needed_by: BTreeMap::new(), queue: VecDeque::new() };
    for root in roots {
        r.add_root(root)?;
    }
    while let Some(name) = r.queue.pop_front() {
        let pkg = r.selected[&name].clone();
        for group in pkg.pre_depends.groups().iter().chain(&pkg.depends.groups()) {
            r.satisfy(&pkg.name, group)?;
        }
    }
    Ok(r.selected.into_values().collect())
}

struct Resolver<'a> {
    index: &'a PackageIndex,
    selected: BTreeMap<String, Package>,
    /// Who pulled a package in (absent for roots), for "needed by a <- b <- root" messages.
    needed_by: BTreeMap<String, String>,
    queue: VecDeque<String>,
}

/// How one alternative can be met.
enum Choice<'a> {
    /// Already satisfied by a selected package.
    Selected,
    /// Select this package.
    Select(&'a Package),
}

impl<'a> Resolver<'a> {
    fn add_root(&mut self, root: &str) -> anyhow::Result<()> {
        let (name, version) = match root.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim())),
            None => (root.trim(), None),
        };
        let arch = &self.index.arch;
        if let Some(version) = version {
            let pkg = self.index.get(name, version).ok_or_else(|| {
                let have = self.have_versions(name);
                anyhow!("root package `{name}={version}` not found in the index for {arch} (have {have})")
            })?;
            if let Some(chosen) = self.selected.get(name) {
                if chosen.version != version {
                    bail!("root `{root}` conflicts with `{name}={}` already selected", chosen.version);
                }
                return Ok(());
            }
            self.select(pkg, None);
            return Ok(());
        }
        let dep = Dep { name: name.to_string(), arch_qualifier: None, constraint: None };
        match self.alternative(&dep) {
            Ok(Choice::Selected) => Ok(()),
            Ok(Choice::Select(pkg)) => {
                self.select(pkg, None);
                Ok(())
            }
            Err(why) => bail!("root package `{name}`: {why}"),
        }
    }

    /// Meets one OR-group of `parent`'s dependencies, or fails naming the chain.
    fn satisfy(&mut self, parent: &str, group: &[Dep]) -> anyhow::Result<()> {
        // An alternative that is already met wins over earlier ones that would need a new package.
        if group.iter().any(|dep| matches!(self.alternative(dep), Ok(Choice::Selected))) {
            return Ok(());
        }
        let mut reasons = Vec::new();
        for dep in group {
            match self.alternative(dep) {
                Ok(Choice::Selected) => return Ok(()),
                Ok(Choice::Select(pkg)) => {
                    self.select(pkg, Some(parent));
                    return Ok(());
                }
                Err(why) => reasons.push(why),
            }
        }
        let chain = self.chain(parent);
        bail!("{} (needed by {chain})", reasons.join("; and "))
    }

    /// Whether and how a single alternative can be met; the error says why not.
    fn alternative(&self, dep: &Dep) -> Result<Choice<'a>, String> {
        self.check_arch_qualifier(dep)?;
        let constraint = dep.constraint.as_ref();
        let holds = |have: &str| constraint.is_none_or(|(op, want)| op.holds(have, want));

        // Real package of that name.
        if let Some(chosen) = self.selected.get(&dep.name) {
            if holds(&chosen.version) {
                return Ok(Choice::Selected);
            }
        }
        let versions = self.index.versions(&dep.name);
        let real = versions.iter().find(|p| holds(&p.version));

        let providers = self.providers_meeting(dep);
        if providers.iter().any(|p| self.selected.get(&p.name).is_some_and(|s| s.version == p.version)) {
            return Ok(Choice::Selected);
        }

        if let Some(chosen) = self.selected.get(&dep.name) {
            // A name is selected once; a different version of it cannot also be installed.
            if providers.is_empty() {
                return Err(format!("`{}` {} is selected but `{dep}` is needed", dep.name, chosen.version));
            }
        } else if let Some(pkg) = real {
            return Ok(Choice::Select(pkg));
        }
        // Providers not blocked by another selected version of the same name.
        let usable: Vec<&Package> = providers.into_iter().filter(|p| !self.selected.contains_key(&p.name)).collect();
        match usable.as_slice() {
            [] => {}
            [only] => return Ok(Choice::Select(only)),
            [first, ..] => {
                let names: Vec<&str> = usable.iter().map(|p| p.name.as_str()).collect();
                tracing::info!("`{}` is provided by {}; choosing `{}`", dep.name, names.join(", "), first.name);
                return Ok(Choice::Select(first));
            }
        }
        Err(self.unsatisfiable(dep, versions.is_empty()))
    }

    /// An architecture-qualified dependency (`foo:arm64`) must name the index's own architecture.
    fn check_arch_qualifier(&self, dep: &Dep) -> Result<(), String> {
        let arch = &self.index.arch;
        match dep.arch_qualifier.as_deref() {
            None | Some("any") | Some("native") => Ok(()),
            Some(q) if q == arch => Ok(()),
            Some(q) => Err(format!("`{dep}` asks for architecture {q}, but the index is for {arch}")),
        }
    }

    /// Virtual providers of the dependency's name whose provided version meets its constraint.
    fn providers_meeting(&self, dep: &Dep) -> Vec<&'a Package> {
        let constraint = dep.constraint.as_ref();
        self.index
            .providers(&dep.name)
            .iter()
            .filter(|p| match (constraint, &p.provided_version) {
                (None, _) => true,
                (Some((op, want)), Some(have)) => op.holds(have, want),
                (Some(_), None) => false, // unversioned provides never meet a versioned dependency
            })
            .filter_map(|p| self.index.get(&p.package, &p.package_version))
            .collect()
    }

    /// Why nothing satisfies the dependency: unknown name, no version in range, or no provider.
    fn unsatisfiable(&self, dep: &Dep, no_real_package: bool) -> String {
        let arch = &self.index.arch;
        if no_real_package && self.index.providers(&dep.name).is_empty() {
            format!("package `{}` not found in the index for {arch}", dep.name)
        } else if let Some((op, want)) = &dep.constraint {
            format!("no version of `{}` satisfies `{op} {want}` (have {})", dep.name, self.have_versions(&dep.name))
        } else {
            format!("no installable provider of `{}` in the index for {arch}", dep.name)
        }
    }

    fn select(&mut self, pkg: &Package, parent: Option<&str>) {
        if let Some(parent) = parent {
            self.needed_by.insert(pkg.name.clone(), parent.to_string());
        }
        self.selected.insert(pkg.name.clone(), pkg.clone());
        self.queue.push_back(pkg.name.clone());
    }

    /// `bar <- busybox-static`: the package and who pulled it in, up to a root.
    fn chain(&self, name: &str) -> String {
        let mut chain = vec![name];
        let mut cur = name;
        while let Some(parent) = self.needed_by.get(cur) {
            if chain.contains(&parent.as_str()) {
                break;
            }
            chain.push(parent);
            cur = parent;
        }
        chain.join(" <- ")
    }

    /// Versions the index has for a name, and provided versions, for error messages.
    fn have_versions(&self, name: &str) -> String {
        let mut have: Vec<String> = self.index.versions(name).iter().map(|p| p.version.clone()).collect();
        have.extend(self.index.providers(name).iter().map(|p| match &p.provided_version {
            Some(v) => format!("{v} provided by {}", p.package),
            None => format!("unversioned provide by {}", p.package),
        }));
        if have.is_empty() {
            "none".to_string()
        } else {
            have.join(", ")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::debian::packages::parse_packages;

    /// A tiny index in `Packages` syntax: `name version [Depends] [| Provides]`.
    fn index(spec: &[(&str, &str, &str, &str)]) -> PackageIndex {
        let mut text = String::new();
        for (name, version, depends, provides) in spec {
            text += &format!(
                "Package: {name}\nVersion: {version}\nArchitecture: arm64\nFilename: pool/{name}.deb\n\
                 Size: 1\nSHA256: {}\n",
                "0".repeat(64)
            );
            if !depends.is_empty() {
                text += &format!("Depends: {depends}\n");
            }
            if !provides.is_empty() {
                text += &format!("Provides: {provides}\n");
            }
            text += "\n";
        }
        PackageIndex::new("arm64", parse_packages(&text).unwrap())
    }

    fn names(pkgs: &[Package]) -> Vec<String> {
        pkgs.iter().map(|p| format!("{}={}", p.name, p.version)).collect()
    }

    #[test]
    fn closure_sorted_highest_version() {
        let idx = index(&[
            ("root", "1", "libc6 (>= 2.36), tool:any", ""),
            ("libc6", "2.36-9", "", ""),
            ("libc6", "2.41-12", "libgcc-s1", ""),
            ("libgcc-s1", "14", "libc6 (>= 2.17)", ""),
            ("tool", "3", "", ""),
            ("unused", "1", "", ""),
        ]);
        let got = resolve(&idx, &["root"]).unwrap();
        assert_eq!(names(&got), ["libc6=2.41-12", "libgcc-s1=14", "root=1", "tool=3"]);
    }

    #[test]
    fn or_groups_prefer_already_selected_then_first_satisfiable() {
        let idx = index(&[("root", "1", "a | b, c", ""), ("a", "1", "", ""), ("b", "1", "", ""), ("c", "1", "missing | b", "")]);
        // `a` is first for root; for `c`, `missing` is unsatisfiable so `b` is taken.
        assert_eq!(names(&resolve(&idx, &["root"]).unwrap()), ["a=1", "b=1", "c=1", "root=1"]);

        let idx = index(&[("root", "1", "b, a | b", ""), ("a", "1", "", ""), ("b", "1", "", "")]);
        // `b` is already selected when `a | b` is seen, so `a` is not pulled in.
        assert_eq!(names(&resolve(&idx, &["root"]).unwrap()), ["b=1", "root=1"]);
    }

    #[test]
    fn virtual_packages() {
        let idx = index(&[
            ("root", "1", "awk, mail-transport-agent", ""),
            ("mawk", "1.3", "", "awk"),
            ("postfix", "3", "", "mail-transport-agent"),
            ("exim4", "4", "", "mail-transport-agent"),
        ]);
        // One provider: taken. Several: first by name (exim4).
        assert_eq!(names(&resolve(&idx, &["root"]).unwrap()), ["exim4=4", "mawk=1.3", "root=1"]);
        // An already selected provider is preferred.
        assert_eq!(names(&resolve(&idx, &["postfix", "root"]).unwrap()), ["mawk=1.3", "postfix=3", "root=1"]);
    }

    #[test]
    fn versioned_provides() {
        let idx = index(&[
            ("root", "1", "libfoo-abi (>= 2)", ""),
            ("libfoo1", "1.0", "", "libfoo-abi (= 1)"),
            ("libfoo2", "2.0", "", "libfoo-abi (= 2)"),
            ("libfoo-any", "9", "", "libfoo-abi"),
        ]);
        assert_eq!(names(&resolve(&idx, &["root"]).unwrap()), ["libfoo2=2.0", "root=1"]);
    }

    #[test]
    fn version_constraints_all_operators() {
        for (dep, want) in [
            ("x (<< 2)", "x=1"),
            ("x (<= 2)", "x=2"),
            ("x (= 1)", "x=1"),
            ("x (>= 2)", "x=3"),
            ("x (>> 2)", "x=3"),
            ("x (< 2)", "x=2"),
            ("x (> 1)", "x=3"),
        ] {
            let idx = index(&[("root", "1", dep, ""), ("x", "1", "", ""), ("x", "2", "", ""), ("x", "3", "", "")]);
            let got = names(&resolve(&idx, &["root"]).unwrap());
            assert_eq!(got, ["root=1", want], "{dep}");
        }
    }

    #[test]
    fn roots_with_versions() {
        let idx = index(&[("x", "1", "", ""), ("x", "2", "", "")]);
        assert_eq!(names(&resolve(&idx, &["x=1"]).unwrap()), ["x=1"]);
        assert_eq!(names(&resolve(&idx, &["x"]).unwrap()), ["x=2"]);
        let err = resolve(&idx, &["x=7"]).unwrap_err().to_string();
        assert!(err.contains("`x=7` not found") && err.contains("have 2, 1"), "{err}");
        let err = resolve(&idx, &["nope"]).unwrap_err().to_string();
        assert!(err.contains("package `nope` not found in the index for arm64"), "{err}");
    }

    #[test]
    fn errors_name_the_chain() {
        let idx = index(&[("busybox-static", "1", "bar", ""), ("bar", "1", "foo", "")]);
        let err = resolve(&idx, &["busybox-static"]).unwrap_err().to_string();
        assert_eq!(err, "package `foo` not found in the index for arm64 (needed by bar <- busybox-static)");

        let idx = index(&[("root", "1", "mid", ""), ("mid", "1", "libc6 (>= 9.0)", ""), ("libc6", "2.41-12", "", "")]);
        let err = resolve(&idx, &["root"]).unwrap_err().to_string();
        assert_eq!(err, "no version of `libc6` satisfies `>= 9.0` (have 2.41-12) (needed by mid <- root)");
    }

    #[test]
    fn foreign_arch_qualifier_is_unsatisfiable() {
        let idx = index(&[("root", "1", "x:amd64 | y:native", ""), ("x", "1", "", ""), ("y", "1", "", "")]);
        assert_eq!(names(&resolve(&idx, &["root"]).unwrap()), ["root=1", "y=1"]);
    }

    #[test]
    fn cycles_terminate() {
        let idx = index(&[("a", "1", "b", ""), ("b", "1", "a", "")]);
        assert_eq!(names(&resolve(&idx, &["a"]).unwrap()), ["a=1", "b=1"]);
    }

    #[test]
    fn pre_depends_count() {
        let text = format!(
            "Package: a\nVersion: 1\nArchitecture: arm64\nPre-Depends: b\nFilename: a.deb\nSize: 1\nSHA256: {z}\n\n\
             Package: b\nVersion: 1\nArchitecture: arm64\nFilename: b.deb\nSize: 1\nSHA256: {z}\n",
            z = "0".repeat(64)
        );
        let idx = PackageIndex::new("arm64", parse_packages(&text).unwrap());
        assert_eq!(names(&resolve(&idx, &["a"]).unwrap()), ["a=1", "b=1"]);
    }
}
