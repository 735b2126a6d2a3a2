"""``nezha.calibration`` (folder calibration/): INT8 calibration: real histories -> Q/DQ graphs (static int8, for ONNX Runtime and TensorRT) and the
CPU-only dynamic int8 variant, with sensitivity analysis and validation against fp32.

The build (export/) calls ``int8_from_onnx`` and ``int8_cpu_from_onnx``; calibration never imports export.
"""

from nezha.runtime.errors import InputError, StepError

from .data import (
           MIN_SAMPLES,
           CalibrationReader,
           FeedList,
           sample_histories,
)
from .quantize import (
           INT8_CPU_SETTINGS,
           METHODS,
           calibrate_ranges,
           int8_cpu_from_onnx,
           int8_from_onnx,
           qdq_from_ranges,
)
from .sensitivity import node_sensitivity, sensitivity_table, weight_matmuls
from .validate import validate_int8

__all__ = ["INT8_CPU_SETTINGS", "METHODS", "MIN_SAMPLES", "InputError", "CalibrationReader",
           "FeedList", "StepError", "calibrate_ranges", "int8_cpu_from_onnx", "int8_from_onnx",
           "node_sensitivity", "qdq_from_ranges", "sample_histories", "sensitivity_table", "validate_int8",
           "weight_matmuls"]
