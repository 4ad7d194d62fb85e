//! `edge-agent discover`: the clusters in a set of images or in a stored replay, written
//! as `clusters.json`, one PNG contact sheet per cluster and an `index.html`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use ndarray::{concatenate, Array2, Axis};
use selfclass_runtime::discover::{discover, DiscoverParams, Discovery};
use selfclass_runtime::fsutil::atomic_write;
use selfclass_runtime::metrics::{score, ClusteringScores};
use selfclass_runtime::replay::ReplayBuffer;
use serde::Serialize;
use tracing::info;

use crate::pipeline::{Model, CONFIDENCE_TEMPERATURE};
use crate::source::{self, CapturedFrame, SourceSpec};
use crate::state::{HeadsState, StateDir};
use crate::thumb;

/// Longest side of a thumbnail kept per item for the contact sheets.
const THUMB_SIDE: u32 = 40;
/// Side of a cell of a contact sheet.
const CELL_SIDE: u32 = 64;
/// Images embedded per network call.
const EMBED_BATCH: usize = 256;

/// What to discover clusters in.
#[derive(Debug, Clone)]
pub enum DiscoverInput {
    Source(SourceSpec),
    State(PathBuf),
}

/// Settings of the command.
#[derive(Debug, Clone)]
pub struct DiscoverOptions {
    pub input: DiscoverInput,
    pub out: PathBuf,
    pub params: DiscoverParams,
    /// Stop after this many images.
    pub limit: Option<usize>,
}

/// Embeddings, thumbnails and labels of the items.
struct Items {
    embeddings: Array2<f32>,
    thumbnails: Vec<image::DynamicImage>,
    labels: Option<Vec<u32>>,
    names: Vec<String>,
}

#[derive(Serialize)]
struct ExemplarJson {
    item: usize,
    name: String,
    confidence: f32,
}

#[derive(Serialize)]
struct ClusterJson {
    id: u32,
    size: usize,
    supported: bool,
    mean_confidence: f64,
    sheet: Option<String>,
    exemplars: Vec<ExemplarJson>,
}

#[derive(Serialize)]
struct HeadJson {
    head: usize,
    classes: usize,
    clusters_used: usize,
    supported_clusters: usize,
    mean_confidence: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    scores: Option<ClusteringScores>,
}

#[derive(Serialize)]
struct ReportJson<'a> {
    model: String,
    input: String,
    items: usize,
    rule: &'a str,
    min_support: usize,
    chosen_head: usize,
    clusters_found: usize,
    heads: Vec<HeadJson>,
    clusters: Vec<ClusterJson>,
}

const RULE: &str = "a cluster is supported when it holds at least max(min_cluster_size, ceil(n / (2 * classes of the smallest head))) items; the head with the most supported clusters is chosen (ties: fewer classes), and its supported clusters are the clusters found";

/// Runs the command; returns the discovery and, with labels, the chosen head's scores.
pub fn run(
    model: &Model,
    options: &DiscoverOptions,
) -> anyhow::Result<(Discovery, Option<ClusteringScores>)> {
    let items = match &options.input {
        DiscoverInput::Source(spec) => embed_source(model, spec, options.limit)?,
        DiscoverInput::State(dir) => replay_items(model, dir)?,
    };
    let heads = match &options.input {
        DiscoverInput::State(dir) => state_heads(model, dir)?,
        DiscoverInput::Source(_) => model.heads.clone(),
    };
    let n = items.embeddings.nrows();
    info!(items = n, "embedded; discovering clusters");
    let found = discover(&heads, items.embeddings.view(), &options.params)?;

    std::fs::create_dir_all(&options.out)
        .with_context(|| format!("output folder {}: cannot create it", options.out.display()))?;
    remove_old_sheets(&options.out)?;

    let mut head_json = Vec::new();
    let mut chosen_scores = None;
    for h in &found.heads {
        let scores = match &items.labels {
            Some(labels) => Some(score(labels, &h.assignments)?),
            None => None,
        };
        if h.head == found.chosen_head {
            chosen_scores = scores;
        }
        head_json.push(HeadJson {
            head: h.head,
            classes: h.classes,
            clusters_used: h.clusters_used,
            supported_clusters: h.supported,
            mean_confidence: h.mean_confidence,
            scores,
        });
    }

    let chosen = found.chosen();
    let mut clusters = Vec::new();
    for c in &chosen.clusters {
        let sheet = if items.thumbnails.is_empty() {
            None
        } else {
            let name = format!("cluster-{:03}.png", c.id);
            let thumbs: Vec<&image::DynamicImage> =
                c.exemplars.iter().map(|&i| &items.thumbnails[i]).collect();
            contact_sheet(&thumbs).save(options.out.join(&name)).with_context(|| {
                format!("writing contact sheet {}", options.out.join(&name).display())
            })?;
            Some(name)
        };
        clusters.push(ClusterJson {
            id: c.id,
            size: c.size,
            supported: c.supported,
            mean_confidence: c.mean_confidence,
            sheet,
            exemplars: c
                .exemplars
                .iter()
                .map(|&i| ExemplarJson {
                    item: i,
                    name: items.names[i].clone(),
                    confidence: chosen.confidences[i],
                })
                .collect(),
        });
    }
    let input = match &options.input {
        DiscoverInput::Source(SourceSpec::Demo) => "demo".to_string(),
        DiscoverInput::Source(SourceSpec::Stdin) => "standard input".to_string(),
        DiscoverInput::Source(SourceSpec::Path(p)) => p.display().to_string(),
        DiscoverInput::State(dir) => format!("replay in {}", dir.display()),
    };
    let report = ReportJson {
        model: model.path.display().to_string(),
        input,
        items: n,
        rule: RULE,
        min_support: found.min_support,
        chosen_head: found.chosen_head,
        clusters_found: found.clusters_found,
        heads: head_json,
        clusters,
    };
    let json = serde_json::to_vec_pretty(&report)?;
    atomic_write(&options.out.join("clusters.json"), &json)?;
    atomic_write(&options.out.join("index.html"), index_html(&report).as_bytes())?;
    Ok((found, chosen_scores))
}

fn embed_source(model: &Model, spec: &SourceSpec, limit: Option<usize>) -> anyhow::Result<Items> {
    let channels = model.bundle.preprocess.channels;
    let mut src = source::open(spec, channels, false)?;
    let mut classifier = model.classifier()?;
    let input_len = classifier.layout().len();
    let mut batch: Vec<f32> = Vec::with_capacity(EMBED_BATCH * input_len);
    let mut chunks: Vec<Array2<f32>> = Vec::new();
    let mut thumbnails = Vec::new();
    let mut labels = Vec::new();
    let mut all_labelled = true;
    let mut names = Vec::new();
    let folder_names: Option<Vec<String>> = match spec {
        SourceSpec::Path(p) if p.is_dir() => Some(
            source::FolderSource::new(p, channels)?
                .paths()
                .map(|p| p.display().to_string())
                .collect(),
        ),
        _ => None,
    };
    let mut frame = CapturedFrame::default();
    let mut count = 0usize;
    while limit.is_none_or(|l| count < l) && src.next_into(&mut frame)? {
        frame.number = count as u64;
        batch.extend_from_slice(classifier.prepare(&frame)?);
        thumbnails.push(thumbnail(&frame)?);
        match frame.label {
            Some(l) => labels.push(l),
            None => all_labelled = false,
        }
        names.push(match &folder_names {
            Some(n) => n.get(count).cloned().unwrap_or_default(),
            None => format!("item {}", frame.item),
        });
        count += 1;
        if batch.len() == EMBED_BATCH * input_len {
            chunks.push(classifier.embed_inputs(&batch)?);
            batch.clear();
        }
    }
    if !batch.is_empty() {
        chunks.push(classifier.embed_inputs(&batch)?);
    }
    anyhow::ensure!(count > 0, "the source holds no image to discover clusters in");
    let views: Vec<_> = chunks.iter().map(|c| c.view()).collect();
    let embeddings = concatenate(Axis(0), &views)?;
    Ok(Items {
        embeddings,
        thumbnails,
        labels: (all_labelled && !labels.is_empty()).then_some(labels),
        names,
    })
}

fn replay_items(model: &Model, dir: &Path) -> anyhow::Result<Items> {
    let state = StateDir::open(dir)?;
    let path = state.replay_path();
    let bytes = std::fs::read(&path).with_context(|| {
        format!("state {}: holds no replay.bin; run the agent with --state first", dir.display())
    })?;
    let replay = ReplayBuffer::from_bytes(&bytes, &path.display().to_string())?;
    anyhow::ensure!(
        replay.dim() == model.bundle.embedding_dim(),
        "state {}: its replay holds embeddings of dimension {}, the model makes {}; use the model it was recorded with",
        dir.display(),
        replay.dim(),
        model.bundle.embedding_dim()
    );
    anyhow::ensure!(!replay.is_empty(), "state {}: the replay is empty", dir.display());
    let (view1, _) = replay.stream_pairs();
    let names = (0..view1.nrows()).map(|i| format!("replay pair {i}")).collect();
    // The agent keeps a thumbnail with every pair; a replay from an agent that did not
    // (or a damaged note) gets a grey cell in its place.
    let decoded: Vec<Option<image::DynamicImage>> =
        replay.stream_notes().into_iter().map(|n| n.and_then(thumb::decode)).collect();
    let with_pictures = decoded.iter().filter(|t| t.is_some()).count();
    let thumbnails = if with_pictures == 0 {
        info!("the replay keeps no thumbnails (an older agent wrote it); no contact sheets");
        Vec::new()
    } else {
        if with_pictures < decoded.len() {
            info!(
                without = decoded.len() - with_pictures,
                "some replay pairs keep no thumbnail; they show as grey cells"
            );
        }
        let blank = image::DynamicImage::ImageLuma8(image::GrayImage::from_pixel(
            thumb::THUMB_SIDE as u32,
            thumb::THUMB_SIDE as u32,
            image::Luma([128]),
        ));
        decoded.into_iter().map(|t| t.unwrap_or_else(|| blank.clone())).collect()
    };
    Ok(Items { embeddings: view1, thumbnails, labels: None, names })
}

/// The adapted heads of a state directory when they belong to this model, else the
/// model's own.
fn state_heads(
    model: &Model,
    dir: &Path,
) -> anyhow::Result<Vec<selfclass_runtime::head::Head<f32>>> {
    let path = StateDir::open(dir)?.heads_path();
    let Ok(bytes) = std::fs::read(&path) else { return Ok(model.heads.clone()) };
    match HeadsState::from_bytes(&bytes) {
        Ok(state) if state.model_digest == model.bundle.digest()? => {
            info!(steps = state.snapshot.steps, "using the adapted heads of the state directory");
            let heads: selfclass_runtime::Result<Vec<_>> =
                state.snapshot.heads.iter().map(|h| h.to_head()).collect();
            Ok(heads?)
        }
        Ok(state) => {
            tracing::warn!(
                heads = %path.display(),
                adapted_from_version = state.model_version,
                model_version = model.bundle.model_version,
                "the state's adapted heads belong to another model; using the model's own heads (pass --model with the model they were adapted from)"
            );
            Ok(model.heads.clone())
        }
        Err(why) => {
            tracing::warn!(heads = %path.display(), %why, "the state's adapted heads cannot be read; using the model's own heads");
            Ok(model.heads.clone())
        }
    }
}

fn thumbnail(frame: &CapturedFrame) -> anyhow::Result<image::DynamicImage> {
    use selfclass_runtime::preprocess::PixelFormat;
    let (w, h) = (frame.width, frame.height);
    let image = match frame.format {
        PixelFormat::Gray8 => image::GrayImage::from_raw(w, h, frame.data.clone())
            .map(image::DynamicImage::ImageLuma8),
        PixelFormat::Rgb8 => {
            image::RgbImage::from_raw(w, h, frame.data.clone()).map(image::DynamicImage::ImageRgb8)
        }
        PixelFormat::Bgr8 => {
            let rgb: Vec<u8> =
                frame.data.chunks_exact(3).flat_map(|p| [p[2], p[1], p[0]]).collect();
            image::RgbImage::from_raw(w, h, rgb).map(image::DynamicImage::ImageRgb8)
        }
        PixelFormat::Yuyv => {
            let luma: Vec<u8> = frame.data.iter().step_by(2).copied().collect();
            image::GrayImage::from_raw(w, h, luma).map(image::DynamicImage::ImageLuma8)
        }
    }
    .context("a frame whose size does not match its pixels")?;
    Ok(if w.max(h) > THUMB_SIDE { image.thumbnail(THUMB_SIDE, THUMB_SIDE) } else { image })
}

/// Deletes the contact sheets an earlier run left in `out` (`cluster-NNN.png`), so the
/// folder shows this run's clusters only.
fn remove_old_sheets(out: &Path) -> anyhow::Result<()> {
    let entries = std::fs::read_dir(out)
        .with_context(|| format!("output folder {}: cannot list it", out.display()))?;
    for path in entries.filter_map(|e| e.ok()).map(|e| e.path()) {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let digits = name.strip_prefix("cluster-").and_then(|n| n.strip_suffix(".png"));
        if digits.is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit())) {
            std::fs::remove_file(&path).with_context(|| {
                format!("output folder: cannot remove the old sheet {}", path.display())
            })?;
        }
    }
    Ok(())
}

/// A square grid of the thumbnails, each scaled to fill a cell.
fn contact_sheet(thumbs: &[&image::DynamicImage]) -> image::RgbImage {
    let columns = (thumbs.len() as f64).sqrt().ceil().max(1.0) as u32;
    let rows = (thumbs.len() as u32).div_ceil(columns).max(1);
    let gap = 2;
    let mut sheet = image::RgbImage::from_pixel(
        columns * (CELL_SIDE + gap) + gap,
        rows * (CELL_SIDE + gap) + gap,
        image::Rgb([40, 40, 40]),
    );
    for (i, thumb) in thumbs.iter().enumerate() {
        let cell =
            thumb.resize(CELL_SIDE, CELL_SIDE, image::imageops::FilterType::Triangle).to_rgb8();
        let (col, row) = (i as u32 % columns, i as u32 / columns);
        let x = gap + col * (CELL_SIDE + gap) + (CELL_SIDE - cell.width()) / 2;
        let y = gap + row * (CELL_SIDE + gap) + (CELL_SIDE - cell.height()) / 2;
        image::imageops::overlay(&mut sheet, &cell, x as i64, y as i64);
    }
    sheet
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn index_html(report: &ReportJson<'_>) -> String {
    let mut html = String::new();
    let _ = write!(
        html,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Clusters: {input}</title>\n<style>body{{font-family:sans-serif;margin:2em;background:#fafafa}}table{{border-collapse:collapse}}td,th{{padding:4px 10px;border-bottom:1px solid #ddd;text-align:left}}.cluster{{display:inline-block;margin:10px;vertical-align:top;background:#fff;padding:8px;border:1px solid #ddd}}img{{image-rendering:pixelated}}</style></head><body>\n<h1>{found} clusters in {items} items</h1>\n<p>Model {model}; input {input}. Head {head} was chosen. Rule: {rule}.</p>\n<table><tr><th>head</th><th>classes</th><th>clusters used</th><th>supported</th><th>mean confidence</th><th>ACC</th><th>NMI</th><th>AMI</th><th>ARI</th></tr>\n",
        input = escape(&report.input),
        found = report.clusters_found,
        items = report.items,
        model = escape(&report.model),
        head = report.chosen_head,
        rule = escape(report.rule),
    );
    for h in &report.heads {
        let s = |f: fn(&ClusteringScores) -> f64| {
            h.scores.as_ref().map_or("-".into(), |s| format!("{:.3}", f(s)))
        };
        let _ = writeln!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.3}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            h.head,
            h.classes,
            h.clusters_used,
            h.supported_clusters,
            h.mean_confidence,
            s(|s| s.acc),
            s(|s| s.nmi),
            s(|s| s.ami),
            s(|s| s.ari)
        );
    }
    html.push_str("</table>\n<h2>Clusters of the chosen head, largest first</h2>\n");
    for c in &report.clusters {
        let picture = match &c.sheet {
            Some(sheet) => {
                format!("<img src=\"{0}\" alt=\"exemplars of cluster {1}\">", escape(sheet), c.id)
            }
            None => "<p>(no images: the replay stores embeddings only)</p>".into(),
        };
        let _ = writeln!(
            html,
            "<div class=\"cluster\"><h3>cluster {}{}</h3><p>{} items, mean confidence {:.3}</p>{}</div>",
            c.id,
            if c.supported { "" } else { " (below support)" },
            c.size,
            c.mean_confidence,
            picture
        );
    }
    let _ = writeln!(html, "<p>Confidence is the largest class probability at temperature {CONFIDENCE_TEMPERATURE}.</p></body></html>");
    html
}
