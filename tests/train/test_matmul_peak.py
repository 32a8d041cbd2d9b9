"""The machine's matmul peak (the MFU denominator) is measured once per process, device and thread count, so many
short runs in one process (a sweep, a scaling grid) do not each spend half a second re-measuring it."""
import torch

from lmstack.train import metrics


def test_the_peak_is_measured_once_per_device_and_thread_count(monkeypatch):
    calls = []

    def fake_measure(device="cpu"):
        calls.append(str(device))
        return 1e9 * len(calls)

    monkeypatch.setattr(metrics, "_PEAKS", {})
    monkeypatch.setattr(metrics, "measure_matmul_peak", fake_measure)
    threads = torch.get_num_threads()
    try:
        assert metrics.matmul_peak("cpu") == 1e9
        assert metrics.matmul_peak(torch.device("cpu")) == 1e9   # the same device, spelled another way
        assert calls == ["cpu"]
        torch.set_num_threads(threads + 1)                      # another thread count is another peak
        assert metrics.matmul_peak("cpu") == 2e9
        assert len(calls) == 2
    finally:
        torch.set_num_threads(threads)
