//! The data path of the overlays: a `dcgan prepare` Job whose flags `dcgan prepare --help`
//! has, writing the directory the coordinator trains from (`DCGAN_DATASET=prepared:DIR`); that
//! directory's volume mounted read-only at the same path in the coordinator and every worker;
//! and the gpu overlay's Job, init containers, coordinator and workers (`--data disk`) run here
//! as processes on a few generated images.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use deploy_checks::*;
use serde_yaml::Value;

/// The overlay that prepares its data with a Job and must read it from disk on the workers.
const PREPARED_OVERLAY: &str = "gpu";

/// The containers of an overlay's Jobs that run `dcgan prepare`, with their Job.
fn prepare_containers(objects: &[Value]) -> Vec<(&Value, &Value)> {
    objects
        .iter()
        .filter(|o| o["kind"].as_str() == Some("Job"))
        .flat_map(|job| {
            job["spec"]["template"]["spec"]["containers"].as_sequence().into_iter().flatten().map(move |c| (job, c))
        })
        .filter(|(_, c)| args(c).get(..2) == Some(&["dcgan".to_string(), "prepare".to_string()][..]))
        .collect()
}

/// The directory after a `--source`/`DCGAN_DATASET` spec's `kind:`.
fn spec_path(spec: &str) -> Option<&str> {
    spec.split_once(':').map(|(_, p)| p).filter(|p| p.starts_with('/'))
}

fn overlay_name(overlay: &Path) -> String {
    overlay.file_name().unwrap().to_string_lossy().into_owned()
}

#[test]
fn prepare_jobs_pass_only_flags_dcgan_prepare_has_and_write_to_a_volume() {
    if !kubectl_available("prepare_jobs_pass_only_flags_dcgan_prepare_has_and_write_to_a_volume") {
        return;
    }
    let help = Help::of_command(&binaries_dir().join("dcgan"), &["prepare"]);
    assert!(help.flags.contains("--out") && help.flags.contains("--image-size"), "dcgan prepare --help: {help:?}");
    let mut seen = Vec::new();
    for overlay in overlays() {
        let objects = render(&overlay);
        for (job, c) in prepare_containers(&objects) {
            let where_ = format!("{} Job/{}", overlay.display(), job["metadata"]["name"].as_str().unwrap_or("?"));
            seen.push(overlay_name(&overlay));
            let args = args(c);
            for arg in &args[2..] {
                for f in flags_and_vars(arg).0 {
                    assert!(help.flags.contains(&f), "{where_}: `dcgan prepare --help` has no flag {f}");
                }
            }
            // $(NAME) is only expanded for a variable the container defines.
            let env = environment(&objects, c);
            for name in args.iter().flat_map(|a| references(a)) {
                assert!(env.contains_key(&name), "{where_}: args use $({name}), which the container does not define");
            }
            let out = flag_value(&args, "--out").unwrap_or_else(|| panic!("{where_}: no --out"));
            let size = flag_value(&args, "--image-size").unwrap_or_else(|| panic!("{where_}: no --image-size"));
            assert!(size.parse::<u32>().is_ok_and(|s| s > 0), "{where_}: --image-size {size}");
            assert!(
                flag_value(&args, "--source").is_some() != flag_value(&args, "--download").is_some(),
                "{where_}: one of --source and --download"
            );

            // The root filesystem is read-only: --out (and --download-dir) on a writable
            // volume, the source on a volume.
            assert_eq!(c["securityContext"]["readOnlyRootFilesystem"].as_bool(), Some(true), "{where_}");
            let writable = |path: &str, what: &str| {
                let m = mount_of(job, c, path).unwrap_or_else(|| panic!("{where_}: {what} {path} is on no volume"));
                assert!(!m.read_only, "{where_}: {what} {path} is on the read-only volume {}", m.volume);
                assert!(m.claim.is_some(), "{where_}: {what} {path} is not on a PersistentVolumeClaim: {m:?}");
            };
            writable(out, "--out");
            if flag_value(&args, "--download").is_some() {
                let dir = flag_value(&args, "--download-dir")
                    .unwrap_or_else(|| panic!("{where_}: --download without --download-dir (its default is relative)"));
                writable(dir, "--download-dir");
            }
            if let Some(source) = flag_value(&args, "--source") {
                let path = spec_path(source).unwrap_or_else(|| panic!("{where_}: --source {source}: no absolute path"));
                assert!(mount_of(job, c, path).is_some(), "{where_}: --source {path} is on no volume");
            }

            // Retries continue where the killed pod stopped; a usage error fails at once.
            let spec = &job["spec"];
            assert_eq!(spec["template"]["spec"]["restartPolicy"].as_str(), Some("Never"), "{where_}");
            assert!(spec["backoffLimit"].as_u64().is_some_and(|b| b >= 1), "{where_}: no retry (backoffLimit)");
            let name = c["name"].as_str().unwrap();
            let fails_on_usage = spec["podFailurePolicy"]["rules"].as_sequence().into_iter().flatten().any(|r| {
                r["action"].as_str() == Some("FailJob")
                    && r["onExitCodes"]["containerName"].as_str() == Some(name)
                    && r["onExitCodes"]["operator"].as_str() == Some("In")
                    && r["onExitCodes"]["values"].as_sequence().is_some_and(|v| v.iter().any(|x| x.as_u64() == Some(2)))
            });
            assert!(fails_on_usage, "{where_}: exit code 2 (a usage error) should fail the Job (podFailurePolicy)");
        }
    }
    assert!(seen.iter().any(|o| o == PREPARED_OVERLAY), "no dcgan prepare Job in the {PREPARED_OVERLAY} overlay");
}

#[test]
fn prepared_data_is_mounted_read_only_at_the_same_path_in_the_coordinator_and_the_workers() {
    if !kubectl_available("prepared_data_is_mounted_read_only_at_the_same_path_in_the_coordinator_and_the_workers") {
        return;
    }
    let mut prepared_overlays = Vec::new();
    for overlay in overlays() {
        let o = overlay.display();
        let objects = render(&overlay);
        let deployment = find(&objects, "Deployment", COORDINATOR);
        let job = find(&objects, "Job", WORKERS);
        let (coordinator, worker) = (container(deployment, "coordinator"), container(job, "worker"));
        let (cenv, wenv) = (environment(&objects, coordinator), environment(&objects, worker));

        // A raw source is prepared into the data cache on the first start: not on the
        // read-only root filesystem.
        if let Some(EnvSource::Literal(cache)) = cenv.get("DCGAN_DATA_CACHE") {
            let m = mount_of(deployment, coordinator, cache)
                .unwrap_or_else(|| panic!("{o}: DCGAN_DATA_CACHE={cache} is on no volume of the coordinator"));
            assert!(!m.read_only, "{o}: DCGAN_DATA_CACHE={cache} is on a read-only volume");
        }

        let dataset = literal(&cenv, "DCGAN_DATASET");
        let Some(dir) = dataset.strip_prefix("prepared:") else {
            continue;
        };
        prepared_overlays.push(overlay_name(&overlay));
        let here = mount_of(deployment, coordinator, dir)
            .unwrap_or_else(|| panic!("{o}: the coordinator's {dir} is on no volume"));
        let claim = here.claim.clone().unwrap_or_else(|| panic!("{o}: {dir} is not on a PersistentVolumeClaim"));
        assert!(here.read_only, "{o}: the coordinator mounts {dir} read-write: {here:?}");

        // Every worker sees the same directory at the same path (so the coordinator's path
        // and content id are theirs), read-only.
        let there = mount_of(job, worker, dir).unwrap_or_else(|| panic!("{o}: the workers do not mount {dir}"));
        assert!(there.read_only, "{o}: the workers mount {dir} read-write: {there:?}");
        assert_eq!(
            (&there.claim, &there.mount_path, &there.sub_path),
            (&here.claim, &here.mount_path, &here.sub_path),
            "{o}: the workers see {dir} elsewhere than the coordinator"
        );
        let choice = match wenv.get("DCGAN_WORKER_DATA") {
            None => "auto",
            Some(EnvSource::Literal(v)) => v.as_str(),
            Some(other) => panic!("{o}: DCGAN_WORKER_DATA {other:?}"),
        };
        assert!(["auto", "disk"].contains(&choice), "{o}: DCGAN_WORKER_DATA={choice} does not read the mounted shards");

        // Pods on several nodes share the claim.
        let pvc = find(&objects, "PersistentVolumeClaim", &claim);
        let modes: Vec<&str> =
            pvc["spec"]["accessModes"].as_sequence().into_iter().flatten().filter_map(Value::as_str).collect();
        if job["spec"]["parallelism"].as_u64().unwrap_or(1) > 1 {
            assert!(modes.contains(&"ReadWriteMany"), "{o}: {claim} is {modes:?}, but the workers share it");
        }

        // The Job that writes the directory: the same volume at the same path, the run's size.
        let writers: Vec<_> = prepare_containers(&objects)
            .into_iter()
            .filter(|(_, c)| flag_value(&args(c), "--out") == Some(dir))
            .collect();
        assert_eq!(writers.len(), 1, "{o}: one dcgan prepare Job should write {dir}");
        let (prepare_job, prepare) = writers[0];
        let written = mount_of(prepare_job, prepare, dir).expect("checked by the other test");
        assert_eq!(
            (&written.claim, &written.mount_path, &written.sub_path),
            (&here.claim, &here.mount_path, &here.sub_path),
            "{o}: the prepare Job writes {dir} elsewhere than the coordinator reads it"
        );
        assert_eq!(
            flag_value(&args(prepare), "--image-size"),
            Some(literal(&cenv, "DCGAN_IMAGE_SIZE")),
            "{o}: the prepare Job's --image-size is not the run's DCGAN_IMAGE_SIZE"
        );

        // Init containers that wait for the manifest wait for this one, on the same volume.
        for (workload, what) in [(deployment, "coordinator"), (job, "workers")] {
            for init in init_containers(workload) {
                let text = args(init).join("\n");
                if text.contains("manifest.json") {
                    assert!(
                        text.contains(dir),
                        "{o}: the {what}' init container waits for another directory than {dir}"
                    );
                    let m = mount_of(workload, init, dir)
                        .unwrap_or_else(|| panic!("{o}: the {what}' init container does not mount {dir}"));
                    assert_eq!(
                        (&m.claim, &m.mount_path),
                        (&here.claim, &here.mount_path),
                        "{o}: {what}' init container"
                    );
                }
            }
        }
    }
    assert!(
        prepared_overlays.iter().any(|o| o == PREPARED_OVERLAY),
        "the {PREPARED_OVERLAY} overlay does not train from a prepared directory"
    );
    let objects = render(&repo_root().join("deploy/k8s/overlays").join(PREPARED_OVERLAY));
    let wenv = environment(&objects, container(find(&objects, "Job", WORKERS), "worker"));
    assert_eq!(
        literal(&wenv, "DCGAN_WORKER_DATA"),
        "disk",
        "the {PREPARED_OVERLAY} overlay's workers should fail, not stream, when the shards are not mounted"
    );
}

/// A PNG of `width x height` RGB pixels, deflate-stored (no compression).
fn png(width: u32, height: u32, rgb: &[u8]) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let crc = crc32(&out[start..]);
        out.extend_from_slice(&crc.to_be_bytes());
    }
    let row = width as usize * 3;
    let raw: Vec<u8> = rgb.chunks(row).flat_map(|r| std::iter::once(0u8).chain(r.iter().copied())).collect();
    let mut zlib = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = raw.chunks(65_535).collect();
    for (i, block) in blocks.iter().enumerate() {
        zlib.push(u8::from(i + 1 == blocks.len()));
        let len = block.len() as u16;
        zlib.extend_from_slice(&len.to_le_bytes());
        zlib.extend_from_slice(&(!len).to_le_bytes());
        zlib.extend_from_slice(block);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for &x in &raw {
        a = (a + u32::from(x)) % 65_521;
        b = (b + a) % 65_521;
    }
    zlib.extend_from_slice(&((b << 16) | a).to_be_bytes());
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut header = width.to_be_bytes().to_vec();
    header.extend_from_slice(&height.to_be_bytes());
    header.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &header);
    chunk(&mut out, b"IDAT", &zlib);
    chunk(&mut out, b"IEND", &[]);
    out
}

/// What the gpu overlay does on a cluster, as processes here at CPU scale: its init
/// containers wait for the data; its `dcgan-prepare` Job's exact command prepares a folder of
/// images (made here) into the directory the coordinator names; the same command again finds
/// it complete (a retried or re-applied Job); the init containers then finish, and the
/// coordinator and two workers (`DCGAN_WORKER_DATA=disk`, on the CPU, small networks) train a
/// complete run, each worker reading the shards itself.
#[test]
fn gpu_overlay_prepares_its_data_and_trains_from_the_shards_as_local_processes() {
    if !kubectl_available("gpu_overlay_prepares_its_data_and_trains_from_the_shards_as_local_processes") {
        return;
    }
    const IMAGES: usize = 64;
    const BATCH: usize = 16;
    let pods = Pods::render(
        PREPARED_OVERLAY,
        &[
            ("DCGAN_WORKERS", "2"),
            ("DCGAN_BATCH_SIZE", &BATCH.to_string()),
            ("DCGAN_EPOCHS", "1"),
            ("DCGAN_NGF", "8"),
            ("DCGAN_NDF", "8"),
            ("DCGAN_NZ", "16"),
            ("DCGAN_CHECKPOINT_EVERY", "2"),
        ],
        &[("DCGAN_DEVICE", "cpu")],
    );
    let objects = pods.objects.clone();
    let (job, prepare) = *prepare_containers(&objects).first().expect("a dcgan prepare Job");
    let (pargs, _) = pods.command(prepare, 0);
    let source = flag_value(&pargs, "--source").expect("--source").to_string();
    let folder = source
        .strip_prefix("folder:")
        .unwrap_or_else(|| panic!("the dry run makes images for folder: only, not {source}"));
    std::fs::create_dir_all(folder).unwrap();
    for i in 0..IMAGES {
        // CelebA's aligned faces are taller than wide: Resize + CenterCrop to a square.
        let (w, h) = (40u32, 48u32);
        let rgb: Vec<u8> = (0..h * w)
            .flat_map(|p| {
                let (x, y, i) = (p % w, p / w, i as u32);
                [(x * 5 + i * 7) as u8, (y * 3 + i * 11) as u8, ((x + y) * 2 + i * 13) as u8]
            })
            .collect();
        std::fs::write(Path::new(folder).join(format!("{i:06}.png")), png(w, h, &rgb)).unwrap();
    }

    // The init containers wait while there is no manifest.
    let deployment = find(&objects, "Deployment", COORDINATOR);
    let workers_job = find(&objects, "Job", WORKERS);
    let mut waiting: Vec<Proc> = [(deployment, "coordinator"), (workers_job, "worker")]
        .into_iter()
        .flat_map(|(w, what)| {
            init_containers(w).into_iter().map(move |c| (format!("{what}-init-{}", c["name"].as_str().unwrap()), c))
        })
        .map(|(name, c)| pods.start(&name, c))
        .collect();
    assert!(!waiting.is_empty(), "the {PREPARED_OVERLAY} overlay has no init container waiting for the data");
    std::thread::sleep(Duration::from_secs(2));
    for p in waiting.iter_mut() {
        assert!(p.child.try_wait().unwrap().is_none(), "{} did not wait for the data:\n{}", p.name, p.output());
    }

    let name = job["metadata"]["name"].as_str().unwrap();
    let mut run = vec![pods.start(name, prepare)];
    wait_all(&mut run, Duration::from_secs(120)).unwrap_or_else(|e| panic!("the prepare Job failed: {e}"));
    let dataset = pods.cenv["DCGAN_DATASET"].clone();
    let dir = dataset.strip_prefix("prepared:").expect("a prepared dataset");
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(dir).join("manifest.json"))
            .unwrap_or_else(|e| panic!("the Job wrote no {dir}/manifest.json ({e}):\n{}", run[0].output())),
    )
    .expect("manifest.json");
    assert_eq!(manifest["count"].as_u64(), Some(IMAGES as u64), "{manifest}");
    let mut again = vec![pods.start(&format!("{name}-again"), prepare)];
    wait_all(&mut again, Duration::from_secs(60)).unwrap_or_else(|e| panic!("the prepare Job's retry failed: {e}"));
    assert!(
        again[0].output().contains("nothing to do"),
        "the retry did not find the set complete:\n{}",
        again[0].output()
    );

    wait_all(&mut waiting, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("the init containers did not finish: {e}"));

    let mut procs = vec![pods.coordinator("coordinator")];
    let addr = pods.address(&mut procs);
    procs.extend(pods.workers(&addr, ""));
    wait_all(&mut procs, Duration::from_secs(300))
        .unwrap_or_else(|e| panic!("the run on the prepared data failed: {e}"));
    assert!(pods.run_dir.join("COMPLETE").is_file(), "the coordinator did not mark the run complete");
    assert_eq!(pods.metrics_steps(), (1..=(IMAGES / BATCH) as u64).collect::<Vec<_>>(), "metrics.jsonl steps");
    for p in &procs[1..] {
        let log = p.output();
        assert!(log.contains("prepared shards in"), "{} did not read the shards from disk:\n{log}", p.name);
    }
}
