//! The catalogue of every setting: TOML key, `HERALD_*` name, type, default and
//! description, derived from the config types themselves. The structs reachable from
//! `Config` are read from their source (embedded below, so the binary has them too)
//! for their fields and doc comments; defaults come from `Config::default()`.
//!
//! It drives `herald config docs` (docs/configuration.md), the `HERALD_*` names
//! `Config::load` accepts and `herald config check` knows, and what `herald config print`
//! redacts. The tests at the bottom fail when a field has no doc comment, when `Config`
//! serializes a key the catalogue lacks, or when docs/configuration.md is stale.
//!
//! A config struct in a file not listed in [`SOURCES`], or a field type the catalogue
//! cannot name, makes `catalog()` an error saying what to add here.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use crate::config::Config;

/// Files whose structs and enums may be (part of) a config section.
pub const SOURCES: &[(&str, &str)] = &[
    ("gateway/src/config.rs", include_str!("config.rs")),
    ("gateway/src/push/config.rs", include_str!("push/config.rs")),
    ("gateway/src/webhooks.rs", include_str!("webhooks.rs")),
];

/// Types of other crates used as settings, and how the docs name them.
const EXTERNAL_TYPES: &[(&str, &str)] = &[
    ("ApnsEnvironment", "`production` \\| `sandbox`"),
    (
        "TrustedProxies",
        "list of CIDRs or addresses (comma-separated in the env)",
    ),
];

/// `HERALD_*` variables that are not settings but are read by `herald` itself.
pub const OTHER_ENV: &[(&str, &str)] = &[
    ("HERALD_CONFIG", "the TOML config file (same as `--config`)"),
    (
        "HERALD_LOG",
        "log filter, e.g. `info`, `debug`, `info,herald_gateway=debug` (tracing EnvFilter syntax)",
    ),
];

/// The command that writes docs/configuration.md; printed at the top of the file.
pub const REGENERATE: &str =
    "cargo run -q -p herald-gateway --bin herald -- config docs > docs/configuration.md";

#[derive(Debug, Clone)]
pub struct Setting {
    /// Dotted TOML path, e.g. `limits.max_message_bytes`.
    pub path: String,
    /// `HERALD_LIMITS__MAX_MESSAGE_BYTES`.
    pub env: String,
    /// How the docs name the type.
    pub ty: String,
    /// The default as TOML; `None` when unset by default.
    pub default: Option<String>,
    pub doc: String,
    /// Redacted by `herald config print`.
    pub secret: bool,
}

#[derive(Debug, Clone)]
pub struct Section {
    /// Dotted TOML path of the table; "" for the top level.
    pub path: String,
    pub doc: String,
    /// An `Option<...>` section (absent unless the file or environment sets a key of it).
    pub optional: bool,
}

#[derive(Debug, Clone)]
pub struct Catalog {
    pub sections: Vec<Section>,
    pub settings: Vec<Setting>,
}

/// Whether a setting's value must never be printed: by its name, so a new `*_secret`,
/// `*_token`, `*password`, `*_pem` or `*_json` field is redacted without anyone
/// remembering to list it. URLs are redacted separately (their password only).
pub fn is_secret_key(name: &str) -> bool {
    name == "secret"
        || name.ends_with("_secret")
        || name.ends_with("_token")
        || name.ends_with("password")
        || name.ends_with("_pem")
        || name.ends_with("_json")
}

/// The catalogue (built once). An error means the config types use something this module
/// cannot describe; the unit tests make sure that never reaches `main`.
pub fn catalog() -> Result<&'static Catalog, String> {
    static CATALOG: OnceLock<Result<Catalog, String>> = OnceLock::new();
    CATALOG.get_or_init(build).as_ref().map_err(Clone::clone)
}

impl Catalog {
    pub fn get(&self, path: &str) -> Option<&Setting> {
        self.settings.iter().find(|s| s.path == path)
    }

    pub fn by_env(&self, env: &str) -> Option<&Setting> {
        self.settings.iter().find(|s| s.env == env)
    }
}

pub fn env_name(path: &str) -> String {
    format!("HERALD_{}", path.replace('.', "__").to_ascii_uppercase())
}

// ---- reading the sources ----------------------------------------------------------

#[derive(Debug, Clone)]
struct Field {
    name: String,
    ty: String,
    doc: String,
}

#[derive(Debug, Clone)]
enum Item {
    Struct { doc: String, fields: Vec<Field> },
    Enum { variants: Vec<String> },
}

fn join_doc(lines: &[String]) -> String {
    let mut out = String::new();
    for l in lines {
        let l = l.trim();
        if l.is_empty() {
            if !out.ends_with("\n\n") && !out.is_empty() {
                out.push_str("\n\n");
            }
            continue;
        }
        if !out.is_empty() && !out.ends_with('\n') {
            out.push(' ');
        }
        out.push_str(l);
    }
    out.trim().to_owned()
}

fn rename(name: &str, rule: Option<&str>) -> String {
    match rule {
        Some("lowercase") => name.to_ascii_lowercase(),
        Some("snake_case") => {
            let mut s = String::new();
            for (i, c) in name.chars().enumerate() {
                if c.is_ascii_uppercase() && i > 0 {
                    s.push('_');
                }
                s.push(c.to_ascii_lowercase());
            }
            s
        }
        _ => name.to_owned(),
    }
}

fn attr_value<'a>(attrs: &'a str, key: &str) -> Option<&'a str> {
    let at = attrs.find(&format!("{key} = \""))? + key.len() + 4;
    let rest = &attrs[at..];
    Some(&rest[..rest.find('"')?])
}

/// Structs and enums of one file with their doc comments and serde attributes. Only
/// what the config types use: one field per line, attributes on their own lines.
fn parse_items(src: &str, out: &mut BTreeMap<String, Item>) -> Result<(), String> {
    let mut docs: Vec<String> = Vec::new();
    let mut attrs = String::new();
    let mut lines = src.lines();
    while let Some(line) = lines.next() {
        let t = line.trim();
        if let Some(d) = t.strip_prefix("///") {
            docs.push(d.strip_prefix(' ').unwrap_or(d).to_owned());
            continue;
        }
        if t.starts_with("#[") {
            attrs.push_str(t);
            continue;
        }
        let header = t
            .strip_prefix("pub struct ")
            .map(|r| (true, r))
            .or_else(|| t.strip_prefix("pub enum ").map(|r| (false, r)));
        let Some((is_struct, rest)) = header.filter(|(_, r)| r.ends_with('{')) else {
            docs.clear();
            attrs.clear();
            continue;
        };
        let name = rest.trim_end_matches('{').trim().to_owned();
        let item_doc = join_doc(&docs);
        let rule = attr_value(&attrs, "rename_all").map(str::to_owned);
        docs.clear();
        attrs.clear();
        let mut fields = Vec::new();
        let mut variants = Vec::new();
        let mut field_attrs = String::new();
        for line in lines.by_ref() {
            let t = line.trim();
            if t == "}" {
                break;
            }
            if let Some(d) = t.strip_prefix("///") {
                docs.push(d.strip_prefix(' ').unwrap_or(d).to_owned());
                continue;
            }
            if t.starts_with("#[") {
                field_attrs.push_str(t);
                continue;
            }
            if t.is_empty() || t.starts_with("//") {
                continue;
            }
            if is_struct {
                let decl = t
                    .strip_prefix("pub(crate) ")
                    .or_else(|| t.strip_prefix("pub "))
                    .unwrap_or(t);
                let (fname, ty) = decl.split_once(':').ok_or_else(|| {
                    format!("struct {name}: cannot read the field line {t:?} (one field per line)")
                })?;
                let serde_skip = field_attrs.contains("skip,")
                    || field_attrs.contains("skip)")
                    || field_attrs.contains("skip_deserializing");
                if field_attrs.contains("flatten") {
                    return Err(format!(
                        "struct {name}: #[serde(flatten)] is not supported by settings.rs"
                    ));
                }
                if !serde_skip {
                    let fname = attr_value(&field_attrs, "rename")
                        .map(str::to_owned)
                        .unwrap_or_else(|| rename(fname.trim(), rule.as_deref()));
                    fields.push(Field {
                        name: fname,
                        ty: ty.trim().trim_end_matches(',').replace(' ', ""),
                        doc: join_doc(&docs),
                    });
                }
            } else {
                let v = t.trim_end_matches(',');
                let v = v.split(['(', '{', ' ']).next().unwrap_or(v);
                variants.push(
                    attr_value(&field_attrs, "rename")
                        .map(str::to_owned)
                        .unwrap_or_else(|| rename(v, rule.as_deref())),
                );
            }
            docs.clear();
            field_attrs.clear();
        }
        let item = if is_struct {
            Item::Struct {
                doc: item_doc,
                fields,
            }
        } else {
            Item::Enum { variants }
        };
        out.insert(name, item);
    }
    Ok(())
}

// ---- walking Config ---------------------------------------------------------------

fn last_segment(ty: &str) -> &str {
    ty.rsplit("::").next().unwrap_or(ty)
}

fn inner<'a>(ty: &'a str, wrapper: &str) -> Option<&'a str> {
    ty.strip_prefix(wrapper)?
        .strip_prefix('<')?
        .strip_suffix('>')
}

fn type_name(ty: &str, items: &BTreeMap<String, Item>, at: &str) -> Result<String, String> {
    if let Some(t) = inner(ty, "Vec") {
        return Ok(format!("list of {}", type_name(t, items, at)?));
    }
    let base = last_segment(ty);
    let named = match base {
        "String" => "string",
        "bool" => "boolean",
        "u8" | "u16" | "u32" | "u64" | "usize" | "i32" | "i64" => "integer",
        "f32" | "f64" => "number",
        "SocketAddr" => "address (`host:port`)",
        "PathBuf" => "path",
        _ => {
            if let Some(Item::Enum { variants }) = items.get(base) {
                return Ok(variants
                    .iter()
                    .map(|v| format!("`{v}`"))
                    .collect::<Vec<_>>()
                    .join(" \\| "));
            }
            if let Some((_, n)) = EXTERNAL_TYPES.iter().find(|(t, _)| *t == base) {
                return Ok((*n).to_owned());
            }
            return Err(format!(
                "setting {at} has type {ty}, which settings.rs cannot describe: add the file \
                 that defines it to SOURCES in gateway/src/settings.rs, or its name to \
                 EXTERNAL_TYPES"
            ));
        }
    };
    Ok(named.to_owned())
}

struct Walk<'a> {
    items: &'a BTreeMap<String, Item>,
    sections: Vec<Section>,
    /// (path, rust type, doc)
    leaves: Vec<(String, String, String)>,
}

impl Walk<'_> {
    fn walk(&mut self, struct_name: &str, prefix: &str) -> Result<(), String> {
        let Some(Item::Struct { fields, .. }) = self.items.get(struct_name) else {
            return Err(format!("struct {struct_name} not found in SOURCES"));
        };
        for f in fields.clone() {
            let path = if prefix.is_empty() {
                f.name.clone()
            } else {
                format!("{prefix}.{}", f.name)
            };
            let (optional, ty) = match inner(&f.ty, "Option") {
                Some(t) => (true, t),
                None => (false, f.ty.as_str()),
            };
            let base = last_segment(ty);
            if let Some(Item::Struct { doc, .. }) = self.items.get(base) {
                let doc = [f.doc.as_str(), doc.as_str()]
                    .iter()
                    .filter(|d| !d.is_empty())
                    .copied()
                    .collect::<Vec<_>>()
                    .join("\n\n");
                self.sections.push(Section {
                    path: path.clone(),
                    doc,
                    optional,
                });
                self.walk(base, &path)?;
            } else {
                self.leaves.push((path, f.ty.clone(), f.doc.clone()));
            }
        }
        Ok(())
    }
}

fn lookup<'a>(value: &'a toml::Value, path: &str) -> Option<&'a toml::Value> {
    path.split('.').try_fold(value, |v, k| v.get(k))
}

/// `Config::default()` as TOML, with every optional section present at its defaults
/// (an empty table deserialized), so their keys have defaults to show.
fn full_defaults(sections: &[Section]) -> Result<toml::Value, String> {
    let mut value = toml::Value::try_from(Config::default()).map_err(|e| e.to_string())?;
    for s in sections.iter().filter(|s| s.optional) {
        let (parent, key) = s.path.rsplit_once('.').unwrap_or(("", &s.path));
        let mut table = &mut value;
        for k in parent.split('.').filter(|k| !k.is_empty()) {
            table = table
                .get_mut(k)
                .ok_or_else(|| format!("section {parent} missing from the defaults"))?;
        }
        if let Some(t) = table.as_table_mut() {
            t.entry(key.to_owned())
                .or_insert_with(|| toml::Value::Table(Default::default()));
        }
        let cfg: Config = value.clone().try_into().map_err(|e| {
            format!(
                "optional section [{}] cannot be built from an empty table (give it \
                 #[serde(default)]): {e}",
                s.path
            )
        })?;
        value = toml::Value::try_from(cfg).map_err(|e| e.to_string())?;
    }
    Ok(value)
}

fn build() -> Result<Catalog, String> {
    let mut items = BTreeMap::new();
    for (_, src) in SOURCES {
        parse_items(src, &mut items)?;
    }
    let mut walk = Walk {
        items: &items,
        sections: vec![Section {
            path: String::new(),
            doc: String::new(),
            optional: false,
        }],
        leaves: Vec::new(),
    };
    walk.walk("Config", "")?;
    let defaults = full_defaults(&walk.sections)?;
    let mut settings = Vec::new();
    for (path, rust_ty, doc) in walk.leaves {
        let (optional, ty) = match inner(&rust_ty, "Option") {
            Some(t) => (true, t),
            None => (false, rust_ty.as_str()),
        };
        let mut ty = type_name(ty, &items, &path)?;
        if optional {
            ty.push_str(", optional");
        }
        let name = path.rsplit('.').next().unwrap_or(&path);
        settings.push(Setting {
            env: env_name(&path),
            secret: is_secret_key(name),
            default: lookup(&defaults, &path).map(toml::Value::to_string),
            path,
            ty,
            doc,
        });
    }
    Ok(Catalog {
        sections: walk.sections,
        settings,
    })
}

// ---- docs/configuration.md --------------------------------------------------------

fn cell(text: &str) -> String {
    text.replace("\n\n", "<br>")
        .replace('\n', " ")
        .replace('|', "\\|")
}

/// docs/configuration.md.
pub fn markdown() -> Result<String, String> {
    let c = catalog()?;
    let mut out = String::new();
    out.push_str(&format!(
        "<!-- Generated from the config types (gateway/src/config.rs, gateway/src/settings.rs); \
         do not edit.\n     Regenerate: {REGENERATE}\n     A unit test (settings::tests) fails \
         when this file differs from the generator's output. -->\n\n"
    ));
    out.push_str(
        "# Configuration\n\n\
         Herald reads its settings in three layers, each overriding the one before: the \
         defaults below, a TOML file (`--config FILE` or `HERALD_CONFIG`), then `HERALD_*` \
         environment variables. A variable's name is the upper-cased TOML path with `__` \
         between the levels below the top: `listen` is `HERALD_LISTEN`, `[limits] \
         max_message_bytes` is `HERALD_LIMITS__MAX_MESSAGE_BYTES`, `[push.fcm] timeout_ms` \
         is `HERALD_PUSH__FCM__TIMEOUT_MS`. Unknown keys in the file are errors.\n\n\
         `herald config check` validates a configuration as `herald serve` would, without \
         starting anything, and warns about `HERALD_*` variables that are not settings; \
         `herald config print` shows the effective configuration with secrets redacted.\n\n\
         Secrets (marked *secret* below) are never printed by `herald config print`; the \
         password of any URL is redacted too.\n\n",
    );
    out.push_str("Other variables `herald` reads:\n\n");
    for (name, what) in OTHER_ENV {
        out.push_str(&format!("- `{name}`: {what}\n"));
    }
    out.push('\n');
    for section in &c.sections {
        let rows: Vec<&Setting> = c
            .settings
            .iter()
            .filter(|s| {
                let parent = s.path.rsplit_once('.').map(|(p, _)| p).unwrap_or("");
                parent == section.path
            })
            .collect();
        if section.path.is_empty() {
            out.push_str("## Top level\n\n");
        } else {
            out.push_str(&format!("## `[{}]`\n\n", section.path));
        }
        if !section.doc.is_empty() {
            out.push_str(&section.doc);
            out.push_str("\n\n");
        }
        if section.optional {
            out.push_str(
                "Optional section: absent unless the file or the environment sets one of its keys.\n\n",
            );
        }
        if rows.is_empty() {
            continue;
        }
        out.push_str("| Key | Environment variable | Type | Default | Description |\n");
        out.push_str("|---|---|---|---|---|\n");
        for s in rows {
            let key = s.path.rsplit('.').next().unwrap_or(&s.path);
            let default = match &s.default {
                Some(d) => format!("`{}`", d.replace('|', "\\|")),
                None => "unset".to_owned(),
            };
            let doc = if s.secret {
                format!("*Secret.* {}", s.doc)
            } else {
                s.doc.clone()
            };
            out.push_str(&format!(
                "| `{key}` | `{}` | {} | {default} | {} |\n",
                s.env,
                s.ty,
                cell(&doc)
            ));
        }
        out.push('\n');
    }
    Ok(out.trim_end().to_owned() + "\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf_paths(v: &toml::Value, prefix: &str, out: &mut Vec<String>) {
        if let toml::Value::Table(t) = v {
            for (k, v) in t {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                if v.is_table() {
                    leaf_paths(v, &p, out);
                } else {
                    out.push(p);
                }
            }
        }
    }

    #[test]
    fn catalogue_builds_and_every_setting_is_documented() {
        let c = catalog().unwrap();
        let undocumented: Vec<&str> = c
            .settings
            .iter()
            .filter(|s| s.doc.trim().is_empty())
            .map(|s| s.path.as_str())
            .collect();
        assert!(
            undocumented.is_empty(),
            "settings without a doc comment in their struct: {undocumented:?}"
        );
        assert!(c.get("limits.max_message_bytes").is_some());
        assert_eq!(
            c.get("push.fcm.timeout_ms").unwrap().default.as_deref(),
            Some("10000")
        );
        assert_eq!(c.get("database_url").unwrap().default, None);
        assert!(c.get("auth.jwt_secret").unwrap().secret);
        assert!(c.get("push.apns.key_pem").unwrap().secret);
        assert!(!c.get("auth.default_token_ttl_seconds").unwrap().secret);
    }

    /// Every key `Config` serializes (optional sections filled in, optional values
    /// set) is in the catalogue, and every catalogued key is one `Config` accepts: a
    /// field the catalogue misses, or one it invents, fails here.
    #[test]
    fn catalogue_matches_the_config_type_exactly() {
        let c = catalog().unwrap();
        let defaults = full_defaults(&c.sections).unwrap();
        let mut serialized = Vec::new();
        leaf_paths(&defaults, "", &mut serialized);
        let known: Vec<&str> = c.settings.iter().map(|s| s.path.as_str()).collect();
        for p in &serialized {
            assert!(known.contains(&p.as_str()), "{p} is not in the catalogue");
        }
        // Each catalogued key, set alone in a file with its default (or, unset by
        // default, with a value of its type), is accepted by Config.
        for s in &c.settings {
            let value = match (&s.default, s.ty.as_str()) {
                (Some(d), _) => d.clone(),
                (None, t) if t.starts_with("address") => "\"127.0.0.1:1\"".into(),
                (None, t) if t.starts_with("integer") => "1".into(),
                (None, t) if t.starts_with("boolean") => "true".into(),
                (None, t) if t.starts_with("list") => "[]".into(),
                (None, _) => "\"x\"".into(),
            };
            let (parent, key) = s.path.rsplit_once('.').unwrap_or(("", &s.path));
            let text = if parent.is_empty() {
                format!("{key} = {value}\n")
            } else {
                format!("[{parent}]\n{key} = {value}\n")
            };
            toml::from_str::<Config>(&text)
                .unwrap_or_else(|e| panic!("catalogued {} is refused by Config: {e}", s.path));
        }
    }

    #[test]
    fn docs_configuration_md_is_up_to_date() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/configuration.md");
        let generated = markdown().unwrap();
        let current = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            current == generated,
            "docs/configuration.md differs from the generator's output; regenerate it \
             (from the repository root): {REGENERATE}"
        );
    }

    #[test]
    fn secret_names() {
        for s in [
            "jwt_secret",
            "secret",
            "metrics_token",
            "key_pem",
            "service_account_json",
            "certificate_password",
        ] {
            assert!(is_secret_key(s), "{s}");
        }
        for s in ["default_token_ttl_seconds", "key_file", "jwt_issuer", "url"] {
            assert!(!is_secret_key(s), "{s}");
        }
    }
}
