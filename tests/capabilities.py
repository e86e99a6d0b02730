"""What this machine's libraries can do, for tests whose expectations depend on it."""

from __future__ import annotations


def openvino_runs_bf16() -> bool:
    """Whether OpenVINO says this CPU computes bfloat16 (its ``OPTIMIZATION_CAPABILITIES``); on a CPU
    without it, an ``INFERENCE_PRECISION_HINT`` of bf16 runs float32 and shows no drift."""
    try:
        import openvino as ov

        return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # noqa: BLE001 - no OpenVINO: nothing runs in bf16 there
        return False
