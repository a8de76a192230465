//! Reading checkpoint tensors by name, and naming a model's parameters for export.
//!
//! A [`Weights`] is a path-scoped view of a [`TensorSource`] (safetensors files, a GGUF file),
//! in the style of candle's `VarBuilder`: each layer's `load` asks for tensors under its own
//! prefix, so parameter paths mirror the checkpoint. Every tensor arrives as f32 with its shape
//! checked against the one the config implies.
//!
//! The opposite direction, [`NamedParam`], lists a loaded model's parameters under their
//! Hugging Face names and layouts, for saving and for gradient checks.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::module::Param;
use burn::tensor::{Device, Tensor, TensorData};
use safetensors::Dtype;

use crate::error::{ModelError, Result};
use crate::layers::TorchLinear;
use crate::quant::{QuantMatrix, QuantSpec};

/// A store of named tensors that can be read as f32.
pub trait TensorSource: Send + Sync {
    /// What to call this source in error messages (a file path).
    fn source_name(&self) -> String;
    /// The shape of a tensor in PyTorch (row-major, outermost first) order, if present.
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    /// The tensor's values as f32, row-major.
    fn read_f32(&self, name: &str) -> Result<Vec<f32>>;
    /// Every tensor name, sorted.
    fn names(&self) -> Vec<String>;
    /// The tensor's stored dtype, for display (`whet info`).
    fn dtype(&self, name: &str) -> Option<String>;
    /// The stored ggml blocks of a quantised `[rows, cols]` tensor, row-major in Hugging Face
    /// order (so rows may be permuted as `read_f32` permutes values). None when the tensor is
    /// not stored in a quantised block format.
    fn read_quantized(&self, _name: &str) -> Option<Result<(whet_gguf::GgmlType, Vec<u8>)>> {
        None
    }
}

/// Which linear layers a loader keeps quantised, and how.
#[derive(Debug, Clone)]
pub struct QuantPolicy {
    /// The storage.
    pub spec: QuantSpec,
    /// Modules left in f32, matched as name suffixes (heads, `modules_to_save`), as
    /// `BitsAndBytesConfig.llm_int8_skip_modules`.
    pub skip: Vec<String>,
}

impl QuantPolicy {
    fn skips(&self, module: &str) -> bool {
        self.skip
            .iter()
            .any(|k| module == k || module.ends_with(&format!(".{k}")))
    }
}

/// A path-scoped handle on a [`TensorSource`] that builds burn tensors on a device.
#[derive(Clone)]
pub struct Weights {
    source: Arc<dyn TensorSource>,
    prefix: String,
    device: Device,
    quant: Option<Arc<QuantPolicy>>,
}

impl Weights {
    /// Wraps a source; tensors are created on `device`.
    pub fn new(source: Arc<dyn TensorSource>, device: &Device) -> Self {
        Self {
            source,
            prefix: String::new(),
            device: device.clone(),
            quant: None,
        }
    }

    /// The same view, loading linear layers quantised as `policy` says.
    pub fn with_quantization(mut self, policy: Option<QuantPolicy>) -> Self {
        self.quant = policy.map(Arc::new);
        self
    }

    /// A view one level down: `pp("encoder")` then `tensor("weight")` reads `encoder.weight`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        Self {
            source: self.source.clone(),
            prefix: self.path(&name.to_string()),
            device: self.device.clone(),
            quant: self.quant.clone(),
        }
    }

    /// The device tensors are created on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The full checkpoint name of `name` under this view.
    pub fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// Whether the checkpoint holds `name` under this view.
    pub fn contains(&self, name: &str) -> bool {
        self.source.shape(&self.path(name)).is_some()
    }

    /// The underlying source.
    pub fn source(&self) -> &Arc<dyn TensorSource> {
        &self.source
    }

    /// The quantised weight `name` of the linear layer at this view, when the quantisation
    /// policy covers it: NF4 of the f32 values (one layer in f32 at a time), or the GGUF file's
    /// own blocks. The matrix is `[d_out, d_in]` whatever `stored_as` is.
    pub fn quantized_linear(
        &self,
        name: &str,
        d_in: usize,
        d_out: usize,
        stored_as: TorchLinear,
    ) -> Result<Option<QuantMatrix>> {
        let Some(policy) = &self.quant else {
            return Ok(None);
        };
        if policy.skips(&self.prefix) || !self.contains(name) {
            return Ok(None);
        }
        let full = self.path(name);
        match policy.spec {
            QuantSpec::Nf4 { double_quant } => {
                let values = match stored_as {
                    TorchLinear::Linear => self.checked_values(name, [d_out, d_in])?,
                    TorchLinear::Conv1D => {
                        let v = self.checked_values(name, [d_in, d_out])?;
                        let mut t = vec![0f32; v.len()];
                        for i in 0..d_in {
                            for o in 0..d_out {
                                t[o * d_in + i] = v[i * d_out + o];
                            }
                        }
                        t
                    }
                };
                Ok(Some(QuantMatrix::nf4(&values, d_out, d_in, double_quant)))
            }
            QuantSpec::Gguf => {
                if stored_as != TorchLinear::Linear {
                    return Ok(None);
                }
                let Some(raw) = self.source.read_quantized(&full) else {
                    return Ok(None);
                };
                let (ty, raw) = raw?;
                self.checked_values_shape(&full, [d_out, d_in])?;
                QuantMatrix::ggml(ty, raw, d_out, d_in)
                    .map(Some)
                    .map_err(|message| ModelError::Input(format!("{full}: {message}")))
            }
        }
    }

    fn checked_values_shape(&self, full: &str, shape: [usize; 2]) -> Result<()> {
        let actual = self
            .source
            .shape(full)
            .ok_or_else(|| ModelError::MissingTensor {
                name: full.to_string(),
                source_name: self.source.source_name(),
            })?;
        if actual != shape {
            return Err(ModelError::ShapeMismatch {
                name: full.to_string(),
                source_name: self.source.source_name(),
                expected: shape.to_vec(),
                actual,
            });
        }
        Ok(())
    }

    fn checked_values(&self, name: &str, shape: [usize; 2]) -> Result<Vec<f32>> {
        let full = self.path(name);
        self.checked_values_shape(&full, shape)?;
        self.source.read_f32(&full)
    }

    /// Reads `name` and checks that its shape is `shape` (PyTorch order).
    pub fn tensor<const D: usize>(&self, name: &str, shape: [usize; D]) -> Result<Tensor<D>> {
        let full = self.path(name);
        let actual = self
            .source
            .shape(&full)
            .ok_or_else(|| ModelError::MissingTensor {
                name: full.clone(),
                source_name: self.source.source_name(),
            })?;
        if actual != shape {
            return Err(ModelError::ShapeMismatch {
                name: full,
                source_name: self.source.source_name(),
                expected: shape.to_vec(),
                actual,
            });
        }
        let values = self.source.read_f32(&full)?;
        Ok(Tensor::from_data(
            TensorData::new(values, shape),
            &self.device,
        ))
    }

    /// Reads the `[rows, cols]` tensor `name` and returns its transpose `[cols, rows]`, laid out
    /// contiguously (the transpose is done on the host once, so no forward pass ever works on a
    /// strided view).
    pub fn tensor_transposed(&self, name: &str, shape: [usize; 2]) -> Result<Tensor<2>> {
        let t = self.tensor(name, shape)?;
        let values = tensor_values(t.into_data());
        let [rows, cols] = shape;
        let mut out = vec![0f32; values.len()];
        // Tiled so both sides stay in cache.
        const TILE: usize = 32;
        for r0 in (0..rows).step_by(TILE) {
            for c0 in (0..cols).step_by(TILE) {
                for r in r0..(r0 + TILE).min(rows) {
                    for c in c0..(c0 + TILE).min(cols) {
                        out[c * rows + r] = values[r * cols + c];
                    }
                }
            }
        }
        Ok(Tensor::from_data(
            TensorData::new(out, [cols, rows]),
            &self.device,
        ))
    }

    /// Reads `name` as a trainable parameter.
    pub fn param<const D: usize>(&self, name: &str, shape: [usize; D]) -> Result<Param<Tensor<D>>> {
        Ok(Param::from_tensor(self.tensor(name, shape)?))
    }
}

/// How a parameter is laid out in the Hugging Face checkpoint relative to whet's tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Stored exactly as whet holds it.
    Same,
    /// whet holds the transpose (PyTorch `nn.Linear` stores `[out, in]`, whet `[in, out]`).
    Transposed,
}

/// A parameter tensor of rank 1 or 2.
#[derive(Debug, Clone)]
pub enum AnyTensor {
    /// A vector (biases, norm weights).
    R1(Tensor<1>),
    /// A matrix (linear weights, embeddings).
    R2(Tensor<2>),
}

/// One of a model's parameters under its Hugging Face name.
#[derive(Debug, Clone)]
pub struct NamedParam {
    /// Checkpoint name, e.g. `encoder.layer.0.attention.self.query.weight`.
    pub name: String,
    /// The tensor as whet holds it (it carries the autodiff node, so `grad` works on it).
    pub tensor: AnyTensor,
    /// How the checkpoint stores it.
    pub layout: Layout,
}

impl NamedParam {
    /// The tensor in checkpoint layout, flattened row-major, as f32.
    pub fn to_checkpoint_values(&self) -> (Vec<usize>, Vec<f32>) {
        let t = match (&self.tensor, self.layout) {
            (AnyTensor::R1(t), _) => {
                return (t.dims().to_vec(), tensor_values(t.clone().into_data()));
            }
            (AnyTensor::R2(t), Layout::Same) => t.clone(),
            (AnyTensor::R2(t), Layout::Transposed) => t.clone().transpose(),
        };
        (t.dims().to_vec(), tensor_values(t.into_data()))
    }

    /// The gradient of this parameter in checkpoint layout, if it has one.
    pub fn checkpoint_grad(
        &self,
        grads: &burn::tensor::Gradients,
    ) -> Option<(Vec<usize>, Vec<f32>)> {
        let g = match &self.tensor {
            AnyTensor::R1(t) => AnyTensor::R1(t.grad(grads)?),
            AnyTensor::R2(t) => AnyTensor::R2(t.grad(grads)?),
        };
        let named = NamedParam {
            name: self.name.clone(),
            tensor: g,
            layout: self.layout,
        };
        Some(named.to_checkpoint_values())
    }
}

/// Values of an f32 tensor as a vector.
pub fn tensor_values(data: TensorData) -> Vec<f32> {
    data.convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap_or_default()
}

/// Visits a model's parameters (and whole linear layers) under their Hugging Face names.
///
/// One traversal per module serves every purpose: exporting for save and gradient checks,
/// freezing, attaching adapters (whet-peft), counting, the optimizer and checkpoints. An
/// attached adapter's parameters are visited like any other, under peft's names
/// ([`crate::layers::ADAPTER_PARAMS`]), after the weight and bias of their layer.
pub trait Visitor {
    /// A rank-1 parameter (bias, norm weight). Ignored unless overridden.
    fn vector(&mut self, _name: &str, _p: &mut Param<Tensor<1>>) {}
    /// A rank-2 parameter with its checkpoint layout. Ignored unless overridden.
    fn matrix(&mut self, _name: &str, _p: &mut Param<Tensor<2>>, _layout: Layout) {}
    /// A linear layer as a whole, before its parameters: where adapters are attached, merged
    /// or switched. Return `true` to skip the default visit of its weight, bias and adapters.
    fn linear(&mut self, _name: &str, _layer: &mut crate::layers::Linear) -> bool {
        false
    }
    /// A frozen quantised weight (`[out, in]`; no parameter, no gradient). Ignored unless
    /// overridden.
    fn quantized(&mut self, _name: &str, _matrix: &crate::quant::QuantMatrix) {}
    /// A family's slot for virtual tokens (prompt learning), before the encoder's parameters.
    /// Return `true` to skip the default visit of those parameters.
    fn prompt(&mut self, _name: &str, _slot: &mut crate::prompt::PromptSlot<'_>) -> bool {
        false
    }
}

/// A module whose parameters can be visited under their checkpoint names.
pub trait VisitParams {
    /// Visits every parameter of `self`, named under `prefix` (empty for the root).
    fn visit_params(&mut self, prefix: &str, v: &mut dyn Visitor);
}

/// Lists a module's parameters under their Hugging Face names (a cheap clone of the module is
/// visited: burn tensors are reference-counted, and the clone shares their autodiff nodes).
pub trait ExportParams {
    /// All parameters, named from the root.
    fn named_params(&self) -> Vec<NamedParam>;
}

impl<T: VisitParams + Clone> ExportParams for T {
    fn named_params(&self) -> Vec<NamedParam> {
        struct Collect(Vec<NamedParam>);
        impl Visitor for Collect {
            fn vector(&mut self, name: &str, p: &mut Param<Tensor<1>>) {
                self.0.push(NamedParam {
                    name: name.to_string(),
                    tensor: AnyTensor::R1(p.val()),
                    layout: Layout::Same,
                });
            }
            fn matrix(&mut self, name: &str, p: &mut Param<Tensor<2>>, layout: Layout) {
                self.0.push(NamedParam {
                    name: name.to_string(),
                    tensor: AnyTensor::R2(p.val()),
                    layout,
                });
            }
        }
        let mut c = Collect(Vec::new());
        self.clone().visit_params("", &mut c);
        c.0
    }
}

/// Joins a prefix and a name with a dot.
pub fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

// ---------------------------------------------------------------------------------------------
// safetensors

struct StEntry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// One or more memory-mapped safetensors files (a single `model.safetensors`, or the shards of
/// `model.safetensors.index.json`).
pub struct SafetensorsSource {
    paths: Vec<PathBuf>,
    maps: Vec<memmap2::Mmap>,
    entries: BTreeMap<String, StEntry>,
}

impl SafetensorsSource {
    /// Opens one safetensors file.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_many(&[path.to_path_buf()])
    }

    /// Opens the weights of a Hugging Face folder: `model.safetensors`, or the shards listed in
    /// `model.safetensors.index.json`.
    pub fn open_folder(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        if single.is_file() {
            return Self::open(&single);
        }
        let index = dir.join("model.safetensors.index.json");
        if !index.is_file() {
            return Err(ModelError::MissingFile {
                path: single,
                hint: "a Hugging Face model folder needs model.safetensors or \
                       model.safetensors.index.json (PyTorch .bin checkpoints are not read)"
                    .into(),
            });
        }
        let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ModelError::Config {
                path: index.clone(),
                message: e.to_string(),
            })?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| ModelError::Config {
                path: index.clone(),
                message: "no \"weight_map\" object".into(),
            })?;
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(|v| v.as_str())
            .map(|f| dir.join(f))
            .collect();
        files.sort();
        files.dedup();
        Self::open_many(&files)
    }

    fn open_many(paths: &[PathBuf]) -> Result<Self> {
        let mut maps = Vec::new();
        let mut entries = BTreeMap::new();
        for (i, path) in paths.iter().enumerate() {
            let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
            // SAFETY: the file is opened read-only and whet never writes to a checkpoint while
            // it is mapped; a concurrent external writer could change the bytes under us, the
            // same caveat every mmap-based safetensors reader carries.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
            let (header_len, meta) =
                safetensors::SafeTensors::read_metadata(&map[..]).map_err(|e| {
                    ModelError::Safetensors {
                        path: path.clone(),
                        message: describe_st_error(&e, map.len()),
                    }
                })?;
            let data_start = 8 + header_len;
            for (name, info) in meta.tensors() {
                let (start, end) = info.data_offsets;
                if data_start + end > map.len() {
                    return Err(ModelError::Safetensors {
                        path: path.clone(),
                        message: format!(
                            "tensor {name} ends at byte {} but the file has {} bytes (truncated?)",
                            data_start + end,
                            map.len()
                        ),
                    });
                }
                entries.insert(
                    name.clone(),
                    StEntry {
                        file: i,
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        start: data_start + start,
                        end: data_start + end,
                    },
                );
            }
            maps.push(map);
        }
        Ok(Self {
            paths: paths.to_vec(),
            maps,
            entries,
        })
    }
}

fn describe_st_error(e: &safetensors::SafeTensorError, len: usize) -> String {
    format!("{e} (file has {len} bytes; truncated or not a safetensors file?)")
}

impl TensorSource for SafetensorsSource {
    fn source_name(&self) -> String {
        match self.paths.as_slice() {
            [one] => one.display().to_string(),
            many => format!(
                "{} ({} shards)",
                many.first()
                    .and_then(|p| p.parent())
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                many.len()
            ),
        }
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.entries.get(name).map(|e| e.shape.clone())
    }

    fn dtype(&self, name: &str) -> Option<String> {
        self.entries.get(name).map(|e| format!("{:?}", e.dtype))
    }

    fn names(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }

    fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.into(),
                source_name: self.source_name(),
            })?;
        let bytes = &self.maps[e.file][e.start..e.end];
        let unsupported = || ModelError::UnsupportedDtype {
            name: name.into(),
            source_name: self.source_name(),
            dtype: format!("{:?}", e.dtype),
        };
        let values: Vec<f32> = match e.dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::F64 => bytes
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as f32)
                .collect(),
            _ => return Err(unsupported()),
        };
        let expected: usize = e.shape.iter().product();
        if values.len() != expected {
            return Err(ModelError::Safetensors {
                path: self.paths[e.file].clone(),
                message: format!(
                    "tensor {name} holds {} values, its shape {:?} needs {expected}",
                    values.len(),
                    e.shape
                ),
            });
        }
        Ok(values)
    }
}

/// Tensors held in memory; used for tests and for renamed / converted checkpoints.
#[derive(Default)]
pub struct MemorySource {
    /// What to call it in errors.
    pub name: String,
    /// name -> (shape, values)
    pub tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
    /// name -> stored dtype, for display; f32 when absent.
    pub dtypes: HashMap<String, String>,
}

impl TensorSource for MemorySource {
    fn source_name(&self) -> String {
        self.name.clone()
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.get(name).map(|(s, _)| s.clone())
    }
    fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        self.tensors
            .get(name)
            .map(|(_, v)| v.clone())
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.into(),
                source_name: self.name.clone(),
            })
    }
    fn names(&self) -> Vec<String> {
        let mut n: Vec<_> = self.tensors.keys().cloned().collect();
        n.sort();
        n
    }
    fn dtype(&self, name: &str) -> Option<String> {
        self.tensors.get(name)?;
        Some(
            self.dtypes
                .get(name)
                .cloned()
                .unwrap_or_else(|| "F32".into()),
        )
    }
}

/// Writes named f32 tensors to a safetensors file atomically (temp file, then rename).
///
/// The tensors are written one after the other from their values, never gathered into one
/// buffer: serialising to bytes first held two more copies of every tensor, so saving a
/// model or an optimizer state tripled its memory for a moment (the peak of a SmolLM2 full
/// fine-tuning run was its final save, 513 MB above the training steps).
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    /// An f32 tensor's little-endian bytes, made when the writer reaches it.
    struct F32View<'a> {
        shape: &'a [usize],
        values: &'a [f32],
    }

    impl safetensors::View for F32View<'_> {
        fn dtype(&self) -> Dtype {
            Dtype::F32
        }
        fn shape(&self) -> &[usize] {
            self.shape
        }
        fn data(&self) -> std::borrow::Cow<'_, [u8]> {
            if cfg!(target_endian = "little") {
                std::borrow::Cow::Borrowed(bytemuck::cast_slice(self.values))
            } else {
                let bytes = self.values.iter().flat_map(|x| x.to_le_bytes()).collect();
                std::borrow::Cow::Owned(bytes)
            }
        }
        fn data_len(&self) -> usize {
            self.values.len() * 4
        }
    }

    for (n, s, v) in tensors {
        if s.iter().product::<usize>() != v.len() {
            return Err(ModelError::Safetensors {
                path: path.to_path_buf(),
                message: format!(
                    "tensor {n}: shape {s:?} holds {} values, not {}",
                    s.iter().product::<usize>(),
                    v.len()
                ),
            });
        }
    }
    let views = tensors.iter().map(|(n, s, v)| {
        (
            n.as_str(),
            F32View {
                shape: s,
                values: v,
            },
        )
    });
    crate::fsutil::replace_atomic(path, |tmp| {
        safetensors::serialize_to_file(views, metadata, tmp).map_err(std::io::Error::other)
    })
}
