//! The trainer's side of a checkpoint: the metadata that says which run and which step it
//! belongs to, and the checks `--resume` makes before continuing from it.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use super::{RunSettings, TrainError};
use crate::checkpoint::{Checkpoint, CheckpointError};
use crate::config::ModelConfig;
use crate::data::{BatchSampler, Dataset};

/// The metadata a checkpoint of `settings` at `step` carries: the settings (as JSON), the
/// step, the sampler's state and the data's fingerprint.
pub(super) fn run_metadata(
    settings: &RunSettings,
    data: &Dataset,
    step: u64,
    sampler: &BatchSampler,
) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("run".into(), to_json(settings)),
        ("config".into(), to_json(&settings.model)),
        ("optimizer".into(), settings.optimizer.to_string()),
        ("step".into(), step.to_string()),
        ("seed".into(), settings.seed.to_string()),
        ("sampler_state".into(), sampler.state().to_string()),
        ("data".into(), data.name.clone()),
        ("data_fingerprint".into(), data.fingerprint.to_string()),
    ])
}

/// Where a checked checkpoint continues: the step it was taken at and the sampler's state.
pub(super) struct ResumePoint {
    /// Steps already taken.
    pub step: u64,
    /// The data sampler's state after them.
    pub sampler_state: u64,
}

/// Checks that `ckpt` (read from `path`) was written by this run, on this data, and is
/// consistent with itself.
pub(super) fn check_run(
    ckpt: &Checkpoint,
    path: &Path,
    settings: &RunSettings,
    data: &Dataset,
) -> Result<ResumePoint, TrainError> {
    let meta = |key: &str| {
        ckpt.metadata.get(key).ok_or_else(|| {
            bad(
                path,
                format!("no `{key}` metadata: not written by `moonlight-ref train`"),
            )
        })
    };
    let number = |key: &str| -> Result<u64, TrainError> {
        meta(key)?
            .parse()
            .map_err(|_| bad(path, format!("`{key}` metadata is not a number")))
    };

    // The run must be the same run: model, optimizer, schedule, batch, seed. Settings added
    // since the checkpoint was written take their defaults (a round trip through
    // `RunSettings` fills them in), so older checkpoints of the same run still match.
    let now = to_json(settings);
    let saved = with_defaults::<RunSettings>(&upgrade_schedule(meta("run")?));
    if saved != now {
        let saved_model = with_defaults::<ModelConfig>(meta("config")?);
        let model_diff = json_differences(&saved_model, &to_json(&settings.model));
        let diff = if model_diff.is_empty() {
            json_differences(&saved, &now)
        } else {
            model_diff.into_iter().map(|d| format!("model.{d}")).collect()
        };
        return Err(bad(
            path,
            format!(
                "it was written by a run with other settings: {}; resume with the options of that run",
                diff.join(", ")
            ),
        ));
    }
    if number("data_fingerprint")? != data.fingerprint {
        return Err(bad(
            path,
            format!(
                "it was trained on other data ({}), not {}",
                meta("data")?,
                data.name
            ),
        ));
    }
    let step = number("step")?;
    if step != ckpt.optimizer.step {
        return Err(bad(
            path,
            format!(
                "its step {step} and its optimizer's step {} differ",
                ckpt.optimizer.step
            ),
        ));
    }
    Ok(ResumePoint {
        step,
        sampler_state: number("sampler_state")?,
    })
}

/// A checkpoint error naming the file.
pub(super) fn bad(path: &Path, msg: String) -> TrainError {
    TrainError::Checkpoint(CheckpointError(format!("{}: {msg}", path.display())))
}

/// JSON of the settings types (plain structs with string keys: serializing cannot fail).
fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("settings serialize to JSON")
}

/// `json` read as a `T` and written again, so fields it lacks get their serde defaults (the
/// text unchanged if it is not a `T`).
fn with_defaults<T: Serialize + serde::de::DeserializeOwned>(json: &str) -> String {
    serde_json::from_str::<T>(json).map_or_else(|_| json.to_string(), |v| to_json(&v))
}

/// Settings written before the schedule was derived from `steps` stored the whole schedule,
/// `"schedule": {"WarmupCosine": {"warmup": W, "total": steps, "floor": 0.1}}`: that is
/// `"warmup": W` now. Anything else is left as it is (and then differs, by name).
fn upgrade_schedule(json: &str) -> String {
    let Ok(serde_json::Value::Object(mut run)) = serde_json::from_str(json) else {
        return json.to_string();
    };
    let old = run.get("schedule").and_then(|s| s.get("WarmupCosine")).cloned();
    let (Some(old), false) = (old, run.contains_key("warmup")) else {
        return json.to_string();
    };
    let moonlight = old.get("floor").and_then(|f| f.as_f64()) == Some(0.1)
        && old.get("total").is_some()
        && old.get("total") == run.get("steps");
    match (moonlight, old.get("warmup")) {
        (true, Some(warmup)) => {
            run.insert("warmup".into(), warmup.clone());
            run.remove("schedule");
            serde_json::Value::Object(run).to_string()
        }
        _ => json.to_string(),
    }
}

/// The fields of two JSON objects that differ, as `name (checkpoint X, now Y)`.
fn json_differences(saved: &str, now: &str) -> Vec<String> {
    let parse = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap_or(serde_json::Value::Null);
    match (parse(saved), parse(now)) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter()
                .filter(|k| a.get(*k) != b.get(*k))
                .map(|k| {
                    let show =
                        |v: Option<&serde_json::Value>| v.map_or("absent".to_string(), |v| v.to_string());
                    format!("{k} (checkpoint {}, now {})", show(a.get(k)), show(b.get(k)))
                })
                .collect()
        }
        _ => vec![format!("checkpoint {saved}, now {now}")],
    }
}

#[cfg(test)]
mod tests {
    use super::upgrade_schedule;

    #[test]
    fn an_old_schedule_becomes_its_warmup() {
        let old = r#"{"steps":40,"schedule":{"WarmupCosine":{"warmup":4,"total":40,"floor":0.1}},"seed":1}"#;
        let new: serde_json::Value = serde_json::from_str(&upgrade_schedule(old)).unwrap();
        assert_eq!(new, serde_json::json!({"steps": 40, "warmup": 4, "seed": 1}));
        // A schedule the settings cannot express stays, so the resume names the difference.
        for other in [
            r#"{"steps":40,"schedule":"Constant"}"#,
            r#"{"steps":40,"schedule":{"WarmupCosine":{"warmup":4,"total":50,"floor":0.1}}}"#,
        ] {
            assert_eq!(upgrade_schedule(other), other);
        }
    }
}
