//! `list`, `get` and `versions`: read-only views of Datastores.

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::{Api, ListParams};
use kube::{Resource, ResourceExt};

use super::Output;
use super::cluster::{Cluster, api_error, get_datastore, namespace_exists, namespace_not_found};
use crate::operator::crd::Datastore;

pub async fn list(cl: &Cluster, api: &Api<Datastore>, output: Option<Output>) -> anyhow::Result<()> {
    let list = api
        .list(&ListParams::default())
        .await
        .map_err(|e| api_error(e, &format!("listing datastores in namespace {:?}", cl.namespace)))?;
    if list.items.is_empty() {
        // The API server lists nothing, without an error, in a namespace that does not exist; a
        // typo in -n deserves better than an empty table.
        if namespace_exists(cl).await == Some(false) {
            return Err(namespace_not_found(cl));
        }
        if matches!(output, None | Some(Output::Wide)) {
            eprintln!("No resources found in {} namespace.", cl.namespace);
            return Ok(());
        }
    }
    print_list(&list.items, output)
}

pub async fn get(cl: &Cluster, api: &Api<Datastore>, name: &str, output: Option<Output>) -> anyhow::Result<()> {
    let ds = get_datastore(cl, api, name).await?;
    match output {
        Some(Output::Yaml) => print!("{}", serde_yaml::to_string(&ds)?),
        Some(Output::Json) => println!("{}", serde_json::to_string_pretty(&ds)?),
        _ => {
            let claim = claim_line(cl, &ds).await;
            print_detail(&ds, &claim);
        }
    }
    Ok(())
}

pub async fn versions(cl: &Cluster, api: &Api<Datastore>, name: &str, output: Option<Output>) -> anyhow::Result<()> {
    let ds = get_datastore(cl, api, name).await?;
    let st = ds.status.unwrap_or_default();
    match output {
        Some(Output::Json) => println!("{}", serde_json::to_string_pretty(&st.versions)?),
        Some(Output::Yaml) => print!("{}", serde_yaml::to_string(&st.versions)?),
        _ => {
            println!("{:<8} {:>12} {:>12}  CREATED", "VERSION", "FILES", "SIZE");
            for v in st.versions {
                println!("{:<8} {:>12} {:>12}  {}", v.number, v.files, bytesize::ByteSize(v.bytes).to_string(), v.created);
            }
        }
    }
    Ok(())
}

/// What the Claim line says. The status names the claim the operator will make, even before it
/// exists (no version yet, a bad spec); only a claim that exists and belongs to this Datastore
/// is shown as its claim.
pub async fn claim_line(cl: &Cluster, ds: &Datastore) -> String {
    let st = ds.status.clone().unwrap_or_default();
    let none = || if st.latest_version.is_none() { "- (made once a version exists)".to_owned() } else { "-".to_owned() };
    let Some(name) = st.claim_name.clone() else { return none() };
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(cl.client.clone(), &cl.namespace);
    match pvcs.get_opt(&name).await {
        Ok(Some(pvc)) => {
            let ours = pvc.owner_references().iter().any(|o| Some(&o.uid) == ds.meta().uid.as_ref());
            if ours { name } else { format!("- (a claim {name} exists but is not this datastore's)") }
        }
        Ok(None) => none(),
        // Not allowed to read claims: trust the status, but only when a version exists.
        Err(_) if st.latest_version.is_some() => name,
        Err(_) => none(),
    }
}

fn age(ds: &Datastore) -> String {
    let Some(t) = ds.metadata.creation_timestamp.as_ref() else { return "-".into() };
    let secs = (k8s_openapi::jiff::Timestamp::now().as_second() - t.0.as_second()).max(0) as u64;
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

pub fn source_of(ds: &Datastore) -> String {
    match (&ds.spec.source.s3, &ds.spec.source.http, &ds.spec.source.upload) {
        (Some(s), _, _) => format!("s3://{}/{}", s.bucket, s.prefix.as_deref().unwrap_or("")),
        (None, Some(h), _) => h.url.clone(),
        (None, None, Some(_)) => "upload".into(),
        (None, None, None) => "-".into(),
    }
}

fn print_list(items: &[Datastore], output: Option<Output>) -> anyhow::Result<()> {
    match output {
        Some(Output::Json) => println!("{}", serde_json::to_string_pretty(items)?),
        Some(Output::Yaml) => print!("{}", serde_yaml::to_string(items)?),
        wide => {
            let wide = wide == Some(Output::Wide);
            print!("{:<32} {:>8} {:<12} {:>10} {:>10} {:>6}", "NAME", "VERSION", "PHASE", "FILES", "SIZE", "AGE");
            if wide {
                print!("  {:<40} MESSAGE", "SOURCE");
            }
            println!();
            for ds in items {
                let st = ds.status.clone().unwrap_or_default();
                print!(
                    "{:<32} {:>8} {:<12} {:>10} {:>10} {:>6}",
                    ds.name_any(),
                    st.latest_version.map(|v| v.to_string()).unwrap_or_else(|| "-".into()),
                    st.phase.map(|p| p.as_str()).unwrap_or("-"),
                    st.files.map(|v| v.to_string()).unwrap_or_else(|| "-".into()),
                    st.size.clone().unwrap_or_else(|| "-".into()),
                    age(ds)
                );
                if wide {
                    print!("  {:<40} {}", source_of(ds), st.message.unwrap_or_default());
                }
                println!();
            }
        }
    }
    Ok(())
}

/// The `get` view (also the end of `status`).
pub fn print_detail(ds: &Datastore, claim: &str) {
    let st = ds.status.clone().unwrap_or_default();
    println!("Name:          {}", ds.name_any());
    println!("Namespace:     {}", ds.namespace().unwrap_or_default());
    println!("Source:        {}", source_of(ds));
    println!("Phase:         {}", st.phase.map(|p| p.as_str()).unwrap_or("-"));
    println!("Latest:        {}", st.latest_version.map(|v| v.to_string()).unwrap_or_else(|| "-".into()));
    println!("Mount path:    {}", ds.mount_path());
    println!("Claim:         {claim}");
    if let Some(m) = &st.message {
        println!("Message:       {m}");
    }
    if let Some(p) = &st.progress {
        println!(
            "Progress:      {}/{} files, {} of {}",
            p.files_done,
            p.files_total,
            bytesize::ByteSize(p.bytes_done),
            bytesize::ByteSize(p.bytes_total)
        );
    }
    if !st.versions.is_empty() {
        println!("Versions:");
        for v in &st.versions {
            println!("  {:<6} {:>10} files {:>10}  {}", v.number, v.files, bytesize::ByteSize(v.bytes).to_string(), v.created);
        }
    }
    if !st.conditions.is_empty() {
        println!("Conditions:");
        for c in &st.conditions {
            println!("  {:<10} {:<6} {:<16} {}", c.type_, c.status, c.reason, c.message);
        }
    }
}
