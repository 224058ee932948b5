//! `mpreg client call|request|health`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use mpreg_actors::protocol::RpcCommand;
use serde_json::Value;

use super::{ClientCommand, RouteCommand};
use crate::client::{CallOptions, Client};

pub fn run(command: ClientCommand) -> anyhow::Result<i32> {
    match command {
        ClientCommand::Health { url } => health(&url),
        ClientCommand::Route(RouteCommand::Explain { cluster, avoid, url, json }) => {
            block_on(route_explain(&cluster, &avoid, &url, json))
        }
        ClientCommand::Queue(command) => block_on(super::queue::run(command)),
        ClientCommand::Cache(command) => block_on(super::cache::run(command)),
        ClientCommand::Call {
            fun,
            args,
            kwargs,
            locs,
            function_id,
            version,
            timeout,
            cache_ttl,
            target_cluster,
            url,
        } => {
            let args = parse_args(&args)?;
            let kwargs = match kwargs {
                Some(text) => match serde_json::from_str(&text).context("--kwargs is not JSON")? {
                    Value::Object(map) => map,
                    other => bail!("--kwargs must be a JSON object, not {other}"),
                },
                None => Default::default(),
            };
            let options = CallOptions {
                kwargs,
                locs,
                function_id,
                version_constraint: version,
                timeout: timeout.map(Duration::from_secs_f64),
                cache_ttl,
                target_cluster,
            };
            block_on(async move {
                let client = Client::connect(&url).await?;
                let result = client.call_with(&fun, args, options).await;
                client.close().await;
                let result = result?;
                println!("{}", serde_json::to_string_pretty(&result)?);
                Ok(0)
            })
        }
        ClientCommand::Status { url, json } => block_on(async move {
            let client = Client::connect(&url).await?;
            let status = client.cluster_status().await;
            client.close().await;
            let status = status?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", render_status(&status));
            }
            Ok(0)
        }),
        ClientCommand::Request { file, url } => {
            let cmds = read_commands(&file)?;
            block_on(async move {
                let client = Client::connect(&url).await?;
                let r = client.request(cmds).await;
                client.close().await;
                let r = r?;
                println!("{}", serde_json::to_string_pretty(&r)?);
                Ok(0)
            })
        }
    }
}

fn block_on(fut: impl std::future::Future<Output = anyhow::Result<i32>>) -> anyhow::Result<i32> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(fut)
}

/// A JSON array is the argument list; any other JSON value is the single argument.
fn parse_args(text: &str) -> anyhow::Result<Vec<Value>> {
    match serde_json::from_str(text).with_context(|| format!("ARGS must be JSON, got {text:?}"))? {
        Value::Array(items) => Ok(items),
        single => Ok(vec![single]),
    }
}

fn read_commands(file: &Path) -> anyhow::Result<Vec<RpcCommand>> {
    let text = if file == Path::new("-") {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text)?;
        text
    } else {
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?
    };
    let value: Value = serde_json::from_str(&text).context("the request file must be JSON")?;
    let cmds = match value {
        Value::Object(mut map) if map.contains_key("cmds") => map.remove("cmds").unwrap_or_default(),
        other => other,
    };
    serde_json::from_value(cmds).context("expected a list of commands ({name, fun, args, ...})")
}

/// The cluster as a person wants to read it: one row per node, then who serves what.
fn render_status(status: &Value) -> String {
    use std::fmt::Write;
    let text = |v: &Value| v.as_str().unwrap_or("-").to_owned();
    let topology = &status["topology"];
    let nodes = topology["nodes"].as_array().cloned().unwrap_or_default();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "cluster {} — {} node(s), as seen from {}\n",
        text(&topology["cluster_id"]),
        nodes.len(),
        text(&topology["node"])
    );
    let mut rows = vec![["NODE", "STATE", "LINK", "NEXT HOP", "SILENT", "URL"].map(str::to_owned).to_vec()];
    for n in &nodes {
        let state = text(&n["state"]);
        let link = if state == "self" {
            "-"
        } else if n["linked"].as_bool() == Some(true) {
            "direct"
        } else {
            "via hop"
        };
        rows.push(vec![
            text(&n["node"]),
            state,
            link.to_owned(),
            text(&n["next_hop"]),
            format!("{:.1}s", n["silent_s"].as_f64().unwrap_or(0.0)),
            text(&n["url"]),
        ]);
    }
    out.push_str(&table(&rows));
    let _ = writeln!(out, "\nfunctions:");
    let mut rows = vec![["NODE", "FUNCTION", "VERSION", "RESOURCES"].map(str::to_owned).to_vec()];
    for entry in status["catalog"]["nodes"].as_array().into_iter().flatten() {
        for f in entry["functions"].as_array().into_iter().flatten() {
            let resources: Vec<String> = f["resources"].as_array().into_iter().flatten().map(text).collect();
            rows.push(vec![text(&entry["node"]), text(&f["name"]), text(&f["version"]), resources.join(",")]);
        }
    }
    out.push_str(&table(&rows));
    out
}

/// Left-aligned columns, two spaces apart.
fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().map(|r| r.get(c).map_or(0, |s| s.chars().count())).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// A minimal HTTP/1.1 GET: the health check must not need more than the binary itself.
/// `mpreg client route explain`: prints the node's explanation; exit 1 when no route is
/// selected.
async fn route_explain(cluster: &str, avoid: &[String], url: &str, json: bool) -> anyhow::Result<i32> {
    let mut query = format!("{}/routes?destination={cluster}", url.trim_end_matches('/'));
    if !avoid.is_empty() {
        query.push_str(&format!("&avoid={}", avoid.join(",")));
    }
    let explanation = crate::demo::http_get_json(&query).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&explanation)?);
    } else {
        print!("{}", render_explanation(&explanation));
    }
    Ok(if explanation["selected"].is_null() { 1 } else { 0 })
}

/// An explanation as text: the rule, one block per candidate, the selected path.
fn render_explanation(e: &Value) -> String {
    use std::fmt::Write as _;
    let path = |v: &Value| {
        v.as_array().map(|p| p.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(" -> ")).unwrap_or_default()
    };
    let mut out = String::new();
    let _ = writeln!(out, "destination: {}", e["destination"].as_str().unwrap_or("?"));
    if let Some(avoid) = e["avoid"].as_array().filter(|a| !a.is_empty()) {
        let _ = writeln!(out, "avoid: {}", avoid.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", "));
    }
    let _ = writeln!(out, "rule: {}", e["rule"].as_str().unwrap_or(""));
    for (i, c) in e["candidates"].as_array().into_iter().flatten().enumerate() {
        let mark = if c["selected"].as_bool() == Some(true) { " (selected)" } else { "" };
        let _ = writeln!(out, "candidate {}{mark}: {}", i + 1, path(&c["path"]));
        let _ = writeln!(out, "  next hop: {}  score: {}", c["next_hop"].as_str().unwrap_or("?"), c["score"]);
        let _ = writeln!(out, "  metrics: {}", c["metrics"]);
        let _ = writeln!(out, "  tie-breakers: {}", c["tiebreakers"]);
        if let Some(why) = c["filtered"].as_str() {
            let _ = writeln!(out, "  filtered: {why}");
        }
    }
    match e["selected"].as_array() {
        Some(_) => {
            let _ = writeln!(out, "selected: {}", path(&e["selected"]));
        }
        None => {
            let _ = writeln!(out, "selected: none (no route)");
        }
    }
    out
}

fn health(url: &str) -> anyhow::Result<i32> {
    let Some(rest) = url.strip_prefix("http://") else { bail!("only http:// URLs are supported: {url}") };
    let (authority, path) = rest.split_once('/').map_or((rest, "/".to_owned()), |(a, p)| (a, format!("/{p}")));
    let addr = std::net::ToSocketAddrs::to_socket_addrs(authority)?.next().context("address did not resolve")?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response.split_whitespace().nth(1).unwrap_or("");
    if status == "200" {
        println!("healthy");
        Ok(0)
    } else {
        eprintln!("unhealthy: status {status:?}");
        Ok(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_accept_a_list_or_one_value() {
        assert_eq!(parse_args("[1,2]").unwrap().len(), 2);
        assert_eq!(parse_args("\"x\"").unwrap(), vec![Value::from("x")]);
        assert!(parse_args("{nope").is_err());
    }
}
