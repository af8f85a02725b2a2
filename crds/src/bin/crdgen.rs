//! Writes the CRD YAML generated from the API types.
//!
//! `crdgen` prints every CRD as one multi-document stream; `crdgen --write DIR`
//! writes one file per CRD into DIR (the repository's `crds/` and the chart's
//! `charts/tandem/crds/` are both produced this way).

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("crdgen: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<(), String> {
    match args {
        [] => {
            for (_, crd) in tandem_crds::all_crds() {
                let yaml = tandem_crds::crd_yaml(&crd).map_err(|e| e.to_string())?;
                print!("---\n{yaml}");
            }
            Ok(())
        }
        [flag, dir] if flag == "--write" => {
            let dir = PathBuf::from(dir);
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            for (file, crd) in tandem_crds::all_crds() {
                let path = dir.join(file);
                let yaml = tandem_crds::crd_yaml(&crd).map_err(|e| e.to_string())?;
                std::fs::write(&path, yaml).map_err(|e| format!("{}: {e}", path.display()))?;
                eprintln!("wrote {}", path.display());
            }
            Ok(())
        }
        _ => Err("usage: crdgen [--write DIR]".to_string()),
    }
}
