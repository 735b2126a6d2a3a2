"""INT8 calibration: real histories -> Q/DQ graphs (static int8, for ONNX Runtime and TensorRT) and the
CPU-only dynamic int8 variant, with sensitivity analysis and validation against fp32.

The build's hook (export/precision.py ``int8_converter``) is ``int8_from_onnx(fp32_graphs, out_dir, feeds)``.
"""

from .data import MIN_SAMPLES, CalibrationError, CalibrationReader, FeedList, sample_histories
from .quantize import (CPU_ONLY, INT8, INT8_CPU, METHODS, Int8ValidationError, calibrate_ranges, int8_cpu_from_onnx,
                       int8_from_onnx, qdq_from_ranges, validate_int8)
from .sensitivity import node_sensitivity, sensitivity_table, weight_matmuls

__all__ = ["CPU_ONLY", "INT8", "INT8_CPU", "METHODS", "MIN_SAMPLES", "CalibrationError", "CalibrationReader",
           "FeedList", "Int8ValidationError", "calibrate_ranges", "int8_cpu_from_onnx", "int8_from_onnx",
           "node_sensitivity", "qdq_from_ranges", "sample_histories", "sensitivity_table", "validate_int8",
           "weight_matmuls"]
