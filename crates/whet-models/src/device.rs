//! Which device whet computes on: `--device` / `WHET_DEVICE` parsed into a [`DeviceSpec`] and
//! opened into a burn [`Device`], with an error that says what is missing when it cannot be.
//!
//! `cpu` is burn's `flex` backend, always built. The GPU runtimes are cargo features of this
//! crate (and of `whet`): `cuda` (NVIDIA, through the driver's library, loaded at run time)
//! and `wgpu` (Vulkan, Metal or DX12; Mesa's software Vulkan, lavapipe, shows up as an adapter
//! of kind `Cpu`). burn's runtimes panic on a missing driver the first time a tensor is made,
//! so [`open`] makes one tiny tensor and reads it back under `catch_unwind`: a device that
//! cannot compute is refused here, with its reason, rather than in the middle of a run.

use std::fmt;
use std::str::FromStr;

use burn::tensor::{Device, Distribution, Tensor};

/// A device as the user names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// burn's `flex` CPU backend.
    Cpu,
    /// The N-th CUDA device.
    Cuda(usize),
    /// A hardware wgpu adapter when there is one, else the software one.
    Wgpu,
    /// The software wgpu adapter (Mesa's lavapipe, or another CPU adapter).
    WgpuCpu,
    /// CUDA, then a hardware wgpu adapter, then the CPU: the first that works in this build.
    Auto,
}

impl DeviceSpec {
    /// The accepted spellings, for help texts and errors.
    pub const CHOICES: &'static str = "cpu, cuda, cuda:N, wgpu, wgpu:cpu, auto";

    /// `WHET_DEVICE`, or `cpu` when it is unset or empty.
    pub fn from_env() -> Result<Self, DeviceError> {
        match std::env::var("WHET_DEVICE") {
            Ok(s) if !s.trim().is_empty() => s.parse(),
            _ => Ok(Self::Cpu),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(i) => write!(f, "cuda:{i}"),
            Self::Wgpu => write!(f, "wgpu"),
            Self::WgpuCpu => write!(f, "wgpu:cpu"),
            Self::Auto => write!(f, "auto"),
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, DeviceError> {
        let s = s.trim().to_ascii_lowercase();
        Ok(match s.as_str() {
            "cpu" => Self::Cpu,
            "cuda" | "gpu" => Self::Cuda(0),
            "wgpu" => Self::Wgpu,
            "wgpu:cpu" => Self::WgpuCpu,
            "auto" => Self::Auto,
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(i)) => Self::Cuda(i),
                _ => return Err(DeviceError::Unknown(s)),
            },
        })
    }
}

/// Why a device cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("unknown device {0:?}: use one of {choices}", choices = DeviceSpec::CHOICES)]
    Unknown(String),
    #[error(
        "device {spec}: this whet was built without the `{feature}` feature; build it with \
         `cargo build --release --features {feature}`"
    )]
    NotBuilt {
        spec: DeviceSpec,
        feature: &'static str,
    },
    #[error("device {spec}: {reason}")]
    Unavailable { spec: DeviceSpec, reason: String },
}

/// An opened device and what it is, for the run's log.
#[derive(Debug, Clone)]
pub struct Opened {
    pub device: Device,
    /// What was asked for.
    pub spec: DeviceSpec,
    /// What it resolved to, e.g. `cpu (flex)` or `wgpu:cpu`; for `auto`, the device chosen.
    pub name: String,
}

impl Opened {
    /// Whether the device is burn's `flex` CPU backend (whet's fused CPU kernels run there).
    pub fn is_cpu(&self) -> bool {
        is_flex(&self.device)
    }
}

/// Whether `device` (or the device an autodiff device wraps) is burn's `flex` CPU backend, where
/// reading a value back costs nothing.
pub fn is_flex(device: &Device) -> bool {
    matches!(
        device.clone().inner().as_dispatch(),
        burn::backend::DispatchDevice::Flex(_)
    )
}

/// Seeds burn's random generator of `device`, and the CPU backend's too: whet draws its random
/// numbers there (see [`random`]), so that one seed gives one run on every device.
pub fn seed(device: &Device, seed: u64) {
    device.seed(seed);
    if !is_flex(device) {
        Device::flex().seed(seed);
    }
}

/// A random tensor on `device`, drawn by the CPU backend's generator and moved there: the
/// GPU runtimes have generators of their own, so drawing on the device would give a LoRA
/// matrix or a new head other values than the CPU gives for the same seed.
pub fn random<const D: usize>(shape: [usize; D], dist: Distribution, device: &Device) -> Tensor<D> {
    if is_flex(device) {
        return Tensor::random(shape, dist, device);
    }
    // Through the host data rather than `to_device`: the tensor then takes the target device's
    // autodiff tracking (moved from the plain CPU device, it would not take gradients).
    Tensor::from_data(
        Tensor::<D>::random(shape, dist, &Device::flex()).into_data(),
        device,
    )
}

/// Opens `spec`, checking that the device computes. `auto` tries CUDA, then a hardware wgpu
/// adapter, then the CPU, and never fails.
pub fn open(spec: DeviceSpec) -> Result<Opened, DeviceError> {
    let opened = |device, name: &str| Opened {
        device,
        spec,
        name: name.to_string(),
    };
    match spec {
        DeviceSpec::Cpu => Ok(opened(Device::flex(), "cpu (flex)")),
        DeviceSpec::Cuda(i) => cuda(i).map(|d| opened(d, &format!("cuda:{i}"))),
        DeviceSpec::WgpuCpu => wgpu(spec, WgpuKind::Software).map(|d| opened(d, "wgpu:cpu")),
        DeviceSpec::Wgpu => match wgpu(spec, WgpuKind::Hardware) {
            Ok(d) => Ok(opened(d, "wgpu (hardware adapter)")),
            Err(DeviceError::Unavailable { .. }) => wgpu(spec, WgpuKind::Software)
                .map(|d| opened(d, "wgpu:cpu (no hardware adapter; the software one)")),
            Err(e) => Err(e),
        },
        DeviceSpec::Auto => {
            if let Ok(d) = cuda(0) {
                return Ok(opened(d, "cuda:0"));
            }
            if let Ok(d) = wgpu(spec, WgpuKind::Hardware) {
                return Ok(opened(d, "wgpu (hardware adapter)"));
            }
            Ok(opened(Device::flex(), "cpu (flex)"))
        }
    }
}

/// [`open`] of `--device`'s value, or of `WHET_DEVICE` when `arg` is `None`.
pub fn open_named(arg: Option<&str>) -> Result<Opened, DeviceError> {
    let spec = match arg {
        Some(s) => s.parse()?,
        None => DeviceSpec::from_env()?,
    };
    open(spec)
}

/// The device tests run on: `WHET_TEST_DEVICE` (same spellings as `--device`), default `cpu`.
/// A device that cannot be opened fails the test that asked, naming why.
pub fn for_tests() -> Device {
    // Opened once per process: test threads opening a wgpu adapter at the same time race to
    // register its runtime, and the loser's `init` fails.
    static DEVICE: std::sync::OnceLock<Device> = std::sync::OnceLock::new();
    DEVICE
        .get_or_init(|| {
            let spec = match std::env::var("WHET_TEST_DEVICE") {
                Ok(s) if !s.trim().is_empty() => s
                    .parse()
                    .unwrap_or_else(|e| panic!("WHET_TEST_DEVICE: {e}")),
                _ => DeviceSpec::Cpu,
            };
            open(spec)
                .unwrap_or_else(|e| panic!("WHET_TEST_DEVICE: {e}"))
                .device
        })
        .clone()
}

#[cfg_attr(not(feature = "wgpu"), allow(dead_code))]
#[derive(Clone, Copy)]
enum WgpuKind {
    Hardware,
    Software,
}

#[cfg(feature = "cuda")]
fn cuda(index: usize) -> Result<Device, DeviceError> {
    let spec = DeviceSpec::Cuda(index);
    cuda_prerequisites().map_err(|reason| DeviceError::Unavailable { spec, reason })?;
    probe(spec, || Device::cuda(index))
}

/// What the CUDA build needs at run time, looked for before burn's runtime starts: it loads the
/// driver and NVRTC in a thread of its own and panics there when one is missing, so [`probe`]
/// would see only a closed channel. whet's CUDA kernels are compiled by NVRTC (cubecl's C++
/// backend, see this crate's Cargo.toml), which also reads the toolkit's headers.
#[cfg(feature = "cuda")]
fn cuda_prerequisites() -> Result<(), String> {
    let libraries = [
        ("cuda", "the NVIDIA driver's library"),
        (
            "nvrtc",
            "NVRTC, the CUDA compiler whet's kernels are compiled with at run time (the CUDA \
             toolkit has it, and so does PyTorch's nvidia-cuda-nvrtc wheel)",
        ),
    ];
    for (name, what) in libraries {
        // The names cudarc tries, in its order (once each: its list repeats some).
        let mut candidates = cudarc::get_lib_name_candidates(name);
        let mut seen = std::collections::HashSet::new();
        candidates.retain(|c| seen.insert(c.clone()));
        if !candidates.iter().any(|c| loadable(c)) {
            return Err(format!(
                "{what} is not installed or not on the library path: none of {} loads \
                 (add its folder to LD_LIBRARY_PATH)",
                candidates.join(", ")
            ));
        }
    }
    let header = cubecl_cuda::install::cuda_path().map(|p| p.join("include").join("cuda_fp16.h"));
    match header {
        Some(h) if h.is_file() => Ok(()),
        Some(h) => Err(format!(
            "NVRTC needs the CUDA toolkit's headers and {} is missing: set CUDA_PATH to the \
             toolkit's folder",
            h.display()
        )),
        None => Err(
            "NVRTC needs the CUDA toolkit's headers and no toolkit was found \
                     (/usr/local/cuda, /opt/cuda): set CUDA_PATH to the toolkit's folder"
                .into(),
        ),
    }
}

/// Whether the dynamic loader finds and loads the shared library `name`.
#[cfg(feature = "cuda")]
fn loadable(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: `c` is a valid C string; a handle dlopen returns is closed once, here.
    unsafe {
        let handle = libc::dlopen(c.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL);
        if handle.is_null() {
            return false;
        }
        libc::dlclose(handle);
    }
    true
}

#[cfg(not(feature = "cuda"))]
fn cuda(index: usize) -> Result<Device, DeviceError> {
    Err(DeviceError::NotBuilt {
        spec: DeviceSpec::Cuda(index),
        feature: "cuda",
    })
}

#[cfg(feature = "wgpu")]
fn wgpu(spec: DeviceSpec, kind: WgpuKind) -> Result<Device, DeviceError> {
    use burn::tensor::DeviceKind;
    let kinds: &[DeviceKind] = match kind {
        WgpuKind::Hardware => &[DeviceKind::DiscreteGpu(0), DeviceKind::IntegratedGpu(0)],
        WgpuKind::Software => &[DeviceKind::Cpu],
    };
    let mut reasons = Vec::new();
    for k in kinds {
        match Device::wgpu_options().device_kind(k.clone()).init() {
            Ok(device) => match probe(spec, || device.clone()) {
                Ok(d) => return Ok(d),
                Err(e) => reasons.push(format!("{k:?}: {e}")),
            },
            Err(e) => reasons.push(format!("{k:?}: {e}")),
        }
    }
    let hint = match kind {
        WgpuKind::Hardware => "no hardware wgpu adapter (Vulkan, Metal or DX12 GPU)",
        WgpuKind::Software => {
            "no software wgpu adapter: install a Vulkan CPU driver (Debian: \
             `apt-get install mesa-vulkan-drivers`, which provides lavapipe)"
        }
    };
    Err(DeviceError::Unavailable {
        spec,
        reason: format!("{hint} ({})", reasons.join("; ")),
    })
}

#[cfg(not(feature = "wgpu"))]
fn wgpu(spec: DeviceSpec, _: WgpuKind) -> Result<Device, DeviceError> {
    Err(DeviceError::NotBuilt {
        spec,
        feature: "wgpu",
    })
}

/// Makes a device and a one-value tensor on it, read back: burn's GPU runtimes initialise
/// lazily and panic when the driver or adapter is missing, so the panic is caught here and
/// becomes the error's reason. The default panic hook is silenced meanwhile: the message is
/// reported once, in the error.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn probe(spec: DeviceSpec, make: impl FnOnce() -> Device) -> Result<Device, DeviceError> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let device = make();
        let x = Tensor::<1>::from_floats([1.5f32], &device).mul_scalar(2.0);
        let back = x.into_data().try_to_vec::<f32>().ok();
        (device, back)
    }));
    std::panic::set_hook(hook);
    match result {
        Ok((device, Some(v))) if v == [3.0] => Ok(device),
        Ok((_, v)) => Err(DeviceError::Unavailable {
            spec,
            reason: format!("computed {v:?} for 1.5 x 2"),
        }),
        Err(panic) => {
            let reason = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "the runtime panicked".into());
            Err(DeviceError::Unavailable { spec, reason })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_print_back() {
        for s in ["cpu", "cuda:0", "cuda:3", "wgpu", "wgpu:cpu", "auto"] {
            let spec: DeviceSpec = s.parse().unwrap();
            assert_eq!(spec.to_string(), s);
        }
        assert_eq!("CUDA".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        let e = "tpu".parse::<DeviceSpec>().unwrap_err().to_string();
        assert!(e.contains("\"tpu\"") && e.contains("wgpu:cpu"), "{e}");
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
    }

    #[test]
    fn cpu_opens_and_auto_falls_back_to_something_that_computes() {
        assert!(open(DeviceSpec::Cpu).unwrap().is_cpu());
        let auto = open(DeviceSpec::Auto).unwrap();
        let x = Tensor::<1>::from_floats([2.0f32], &auto.device) * 3.0;
        assert_eq!(x.into_data().try_to_vec::<f32>().unwrap(), [6.0]);
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_runtime_not_built_is_refused_naming_the_feature() {
        let e = open(DeviceSpec::Cuda(0)).unwrap_err().to_string();
        assert!(e.contains("--features cuda"), "{e}");
    }

    #[cfg(not(feature = "wgpu"))]
    #[test]
    fn wgpu_not_built_is_refused_naming_the_feature() {
        let e = open(DeviceSpec::WgpuCpu).unwrap_err().to_string();
        assert!(e.contains("--features wgpu"), "{e}");
    }
}
