//! Item F: the fleet bridge (`zgate-bridge`) into a 3-node JetStream cluster. The work is done
//! by the bridge crate's load generator (`bridge/examples/loadgen`, which links async-nats;
//! this harness does not): it starts the cluster, the bridge and 1,000 simulated gateways, and
//! prints its rows as JSON lines, which become rows of the report here.

use crate::report::{Report, Status};
use crate::{Opts, Res};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

pub fn bench_fleet(o: &Opts, r: &mut Report) -> Res<()> {
    for (what, path) in [("bridge", &o.bridge), ("load generator", &o.loadgen)] {
        if !path.exists() {
            return Err(format!(
                "{what} {} not found (cargo build --release -p zgate-bridge --bin zgate-bridge \
                 --example loadgen)",
                path.display()
            ));
        }
    }
    let mut cmd = Command::new(&o.loadgen);
    cmd.arg("bench").arg("--bridge").arg(&o.bridge);
    if o.quick {
        cmd.arg("--quick");
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("{}: {e}", o.loadgen.display()))?;
    let out = BufReader::new(child.stdout.take().expect("piped"));
    let mut rows = 0;
    for line in out.lines() {
        let line = line.map_err(|e| e.to_string())?;
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if let Some(n) = v["note"].as_str() {
            r.notes.push(n.to_string());
            continue;
        }
        let text = |k: &str| v[k].as_str().unwrap_or("").to_string();
        let status = match v["ok"].as_bool() {
            Some(true) => Status::Pass,
            Some(false) => Status::Fail,
            None => Status::Info,
        };
        r.push("F", text("what"), text("result"), text("budget"), status);
        rows += 1;
    }
    let st = child.wait().map_err(|e| e.to_string())?;
    if !st.success() && rows == 0 {
        return Err(format!("{} exited with {st}", o.loadgen.display()));
    }
    Ok(())
}
