//! `create`, `list`, `versions`, `delete` and `gc` against a store.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;

use super::StoreArgs;
use super::progress::ProgressReporter;
use crate::store::http::{HttpImportOptions, HttpSource, Unpack, import_from_http};
use crate::store::import::{ImportMode, ImportOptions, S3Source, import_from_s3};
use crate::store::names::validate_datastore_name;
use crate::store::upload::{Progress, Report, SymlinkPolicy, UploadOptions, create_from_dir};

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Datastore name (a DNS-1123 label: lower-case letters, digits and '-').
    pub name: String,
    /// Source: a local directory, s3://BUCKET/PREFIX/ or an http(s):// URL (same as --source).
    #[arg(value_name = "SRC", conflicts_with = "source")]
    pub src: Option<String>,
    /// Source: a local directory, s3://BUCKET/PREFIX/ or an http(s):// URL.
    #[arg(long, value_name = "SRC")]
    pub source: Option<String>,
    /// For http(s) sources: unpack archives (tar, tar.gz/zst/bz2/xz, zip; recognized by their
    /// content), or keep the download as one file.
    #[arg(long, value_enum, default_value = "auto")]
    pub unpack: Unpack,
    /// For http(s) sources: fail (committing nothing) when the unpacked content exceeds this.
    #[arg(long, value_name = "SIZE", default_value = "1TiB", value_parser = super::parse_size)]
    pub max_unpacked_size: u64,
    /// For s3:// sources: copy the objects into the store, or reference them in place.
    #[arg(long, value_enum, default_value = "copy")]
    pub mode: ImportMode,
    /// What to do with symlinks in a local source.
    #[arg(long, value_enum, default_value = "preserve")]
    pub symlinks: SymlinkPolicy,
    /// Files transferred at once.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub concurrency: u16,
    /// For local directories: files up to this size are sent in packs (many files per object,
    /// at most 8MiB each); 0 sends one object per file.
    #[arg(long, value_name = "SIZE", default_value = "1MiB", value_parser = super::parse_size)]
    pub pack_threshold: u64,
    /// For s3:// and http(s) sources: make no version when nothing changed since the latest one.
    #[arg(long)]
    pub skip_unchanged: bool,
    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(Debug, Args)]
pub struct VersionsArgs {
    /// Datastore name.
    pub name: String,
    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Datastore name.
    pub name: String,
    /// Delete only this version (and the objects no other version uses).
    #[arg(long)]
    pub version: Option<u64>,
    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(Debug, Args)]
pub struct GcArgs {
    /// Datastore name.
    pub name: String,
    #[command(flatten)]
    pub store: StoreArgs,
}

pub async fn create(a: CreateArgs) -> anyhow::Result<()> {
    validate_datastore_name(&a.name)?;
    let Some(src) = a.src.or(a.source) else {
        bail!(
            "give a source: datastore create NAME SRC (a directory, s3://bucket/prefix/ or an http(s):// URL)"
        );
    };
    let store = a.store.open().await?;
    let progress = std::sync::Arc::new(Progress::default());
    let is_http = src.starts_with("http://") || src.starts_with("https://");
    // URLs are shown without their query (tokens of pre-signed URLs) and credentials.
    let shown = if is_http {
        crate::store::http::shown_url(&src)
    } else {
        src.clone()
    };
    let reporter = ProgressReporter::start(progress.clone(), &format!("{} → {}", shown, a.name));
    let result: anyhow::Result<Report> = async {
        if is_http {
            let source = HttpSource {
                url: src.clone(),
                headers: Vec::new(),
                ..Default::default()
            };
            let opts = HttpImportOptions {
                unpack: a.unpack,
                max_unpacked_bytes: a.max_unpacked_size,
                concurrency: usize::from(a.concurrency),
                skip_if_unchanged: a.skip_unchanged,
            };
            Ok(import_from_http(&store, &a.name, &source, &opts, &progress).await?)
        } else if src.starts_with("s3://") {
            let source = S3Source::parse(&src)?;
            let opts = ImportOptions {
                mode: a.mode,
                concurrency: usize::from(a.concurrency),
                skip_if_unchanged: a.skip_unchanged,
            };
            let client = store.s3().await.clone();
            Ok(import_from_s3(&store, &client, &a.name, &source, &opts, &progress).await?)
        } else {
            let dir = PathBuf::from(&src);
            if !dir.is_dir() {
                bail!("source {src:?} is not a directory (nor an s3:// or http(s):// URL)");
            }
            let opts = UploadOptions {
                concurrency: usize::from(a.concurrency),
                symlinks: a.symlinks,
                pack_threshold: a.pack_threshold,
            };
            Ok(create_from_dir(&store, &a.name, &dir, &opts, &progress).await?)
        }
    }
    .await;
    reporter.finish();
    let report = result.with_context(|| format!("creating {} from {shown}", a.name))?;
    for s in &report.skipped {
        eprintln!("skipped {}: {}", s.path, s.reason);
    }
    let i = &report.info;
    if report.unchanged {
        eprintln!(
            "{}: source unchanged; latest version is still {}",
            a.name, report.version
        );
    } else {
        eprintln!(
            "{}@{}: {} files, {} dirs, {} ({} bytes); transferred {} files, {} ({} bytes); {} skipped",
            a.name,
            report.version,
            i.files,
            i.dirs,
            bytesize::ByteSize(i.bytes),
            i.bytes,
            i.transferred_files,
            bytesize::ByteSize(i.transferred_bytes),
            i.transferred_bytes,
            report.skipped.len()
        );
    }
    println!("{}", report.version);
    Ok(())
}

pub async fn list(a: ListArgs) -> anyhow::Result<()> {
    let store = a.store.open().await?;
    let names = store.list_datastores().await?;
    println!(
        "{:<40} {:>8} {:>12} {:>12}  CREATED",
        "NAME", "VERSION", "FILES", "SIZE"
    );
    for name in names {
        let Some(v) = store.latest(&name).await? else {
            continue;
        };
        let info = store.version_info(&name, v).await?;
        println!(
            "{:<40} {:>8} {:>12} {:>12}  {}",
            name,
            v,
            info.files,
            bytesize::ByteSize(info.bytes).to_string(),
            info.created
        );
    }
    Ok(())
}

pub async fn versions(a: VersionsArgs) -> anyhow::Result<()> {
    validate_datastore_name(&a.name)?;
    let store = a.store.open().await?;
    let versions = store.versions(&a.name).await?;
    if versions.is_empty() {
        bail!("datastore {:?} does not exist in {}", a.name, store.url());
    }
    println!(
        "{:>8} {:>12} {:>12} {:>12}  {:<10} {:<22} SOURCE",
        "VERSION", "FILES", "SIZE", "TRANSFERRED", "MODE", "CREATED"
    );
    for v in versions {
        let i = store.version_info(&a.name, v).await?;
        println!(
            "{:>8} {:>12} {:>12} {:>12}  {:<10} {:<22} {}",
            v,
            i.files,
            bytesize::ByteSize(i.bytes).to_string(),
            bytesize::ByteSize(i.transferred_bytes).to_string(),
            i.mode,
            i.created,
            i.source
        );
    }
    Ok(())
}

pub async fn delete(a: DeleteArgs) -> anyhow::Result<()> {
    validate_datastore_name(&a.name)?;
    let store = a.store.open().await?;
    match a.version {
        Some(v) => {
            store.resolve_version(&a.name, Some(v)).await?;
            let swept = store.delete_version(&a.name, v).await?;
            eprintln!("deleted {}@{v}", a.name);
            report_sweep(&a.name, &swept);
        }
        None => {
            if store.versions(&a.name).await?.is_empty()
                && store.object_ids(&a.name).await?.is_empty()
            {
                bail!("datastore {:?} does not exist in {}", a.name, store.url());
            }
            let n = store.delete_datastore(&a.name).await?;
            eprintln!("deleted {}: {n} objects", a.name);
        }
    }
    Ok(())
}

pub async fn gc(a: GcArgs) -> anyhow::Result<()> {
    validate_datastore_name(&a.name)?;
    let store = a.store.open().await?;
    let swept = store.sweep(&a.name).await?;
    report_sweep(&a.name, &swept);
    Ok(())
}

fn report_sweep(name: &str, s: &crate::store::gc::Swept) {
    match &s.deferred {
        Some(why) => eprintln!(
            "{name}: unused objects stay for now: {why}; `datastore gc {name}` collects them later"
        ),
        None => eprintln!(
            "{name}: {} unused objects removed, {} freed",
            s.objects,
            bytesize::ByteSize(s.bytes)
        ),
    }
    if !s.kept_for_mounts.is_empty() {
        eprintln!(
            "{name}: objects of deleted versions {:?} stay while they are mounted",
            s.kept_for_mounts
        );
    }
}

// The store stays free of clap (DESIGN): the CLI gives the store's option enums (`Unpack`,
// `ImportMode`, `SymlinkPolicy`) their flag values and help here.
impl clap::ValueEnum for Unpack {
    fn value_variants<'a>() -> &'a [Self] {
        &[Unpack::Auto, Unpack::Never]
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(
            clap::builder::PossibleValue::new(self.as_str()).help(match self {
                Unpack::Auto => "unpack archives recognized by their content",
                Unpack::Never => "keep the download as one file",
            }),
        )
    }
}

impl clap::ValueEnum for ImportMode {
    fn value_variants<'a>() -> &'a [Self] {
        &[ImportMode::Copy, ImportMode::Reference]
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(
            clap::builder::PossibleValue::new(self.as_str()).help(match self {
                ImportMode::Copy => {
                    "Server-side copy of every object into the store: the version keeps working when the source changes or disappears"
                }
                ImportMode::Reference => {
                    "No copy: the version reads the source objects in place, pinned to their ETags"
                }
            }),
        )
    }
}

impl clap::ValueEnum for SymlinkPolicy {
    fn value_variants<'a>() -> &'a [Self] {
        &[SymlinkPolicy::Preserve, SymlinkPolicy::Follow]
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        let (name, help) = match self {
            SymlinkPolicy::Preserve => (
                "preserve",
                "Keep links as links (their target text is stored verbatim and resolved in the reader's filesystem, like `cp -P` or `tar`)",
            ),
            SymlinkPolicy::Follow => (
                "follow",
                "Store what the link points to (dangling links and loops are skipped and reported)",
            ),
        };
        Some(clap::builder::PossibleValue::new(name).help(help))
    }
}
