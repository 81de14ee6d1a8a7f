"""Export: ONNX (torch.export-based) with onnxruntime parity checks and manifests.
Lives in the top-level export/ folder and imports as ``effvision.export``."""
from .manifest import package_versions, sha256, write_manifest
from .model_dir import export_model_dir
from .onnx import OnnxExportConfig, ParityError, check_parity, export_onnx
from .deploy import DeployConfig, export_deployable
from .tensorrt_check import Violation, check_tensorrt

__all__ = ["OnnxExportConfig", "ParityError", "check_parity", "export_onnx", "export_model_dir",
           "package_versions", "sha256", "write_manifest", "DeployConfig", "export_deployable",
           "Violation", "check_tensorrt"]
