"""Every rank's hardware in the training run: MLflow's system metrics, one node id per rank.

MLflow's ``SystemMetricsMonitor`` samples CPU, memory, disk, network and (with pynvml) GPU,
and names each metric ``system/<node id>/<metric>``. Each rank sets its node id to
``rank<r>-<node ip>`` (``mlflow.set_system_metrics_node_id``) and adds its own process's CPU
and resident memory, which, unlike the machine-wide figures, differ between ranks on one node.

Sampling uses MLflow's monitors; delivery does not use MLflow's thread, which gives up at
the first failed request: each rank's samples go through its own ``RankZeroLogger`` queue
(enabled on every rank, used only by this thread), so an MLflow outage delays them, never
drops them or stops training.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Optional

from mlflow.system_metrics.metrics.base_metrics_monitor import BaseMetricsMonitor

from pipeline.logger import RankZeroLogger

log = logging.getLogger(__name__)


class ProcessMonitor(BaseMetricsMonitor):
    """CPU and resident memory of this rank's own process."""

    def __init__(self) -> None:
        import psutil

        super().__init__()
        self._proc = psutil.Process()
        self._proc.cpu_percent()  # the first call only sets the reference point

    def collect_metrics(self) -> None:
        self._metrics["process_cpu_utilization_percentage"].append(self._proc.cpu_percent())
        self._metrics["process_memory_rss_megabytes"].append(self._proc.memory_info().rss / 1e6)

    def aggregate_metrics(self) -> dict:
        return {k: round(sum(v) / len(v), 1) for k, v in self._metrics.items() if v}


class RankSystemMetrics:
    """Samples every ``interval_s`` seconds in a daemon thread; ``finish`` stops and delivers."""

    def __init__(self, uri: str, run_id: str, node_id: str, interval_s: float, samples_before_logging: int = 1):
        import mlflow
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.log = RankZeroLogger(uri, run_id, enabled=True, flush_timeout_s=60.0)  # sets short HTTP retries first
        mlflow.set_system_metrics_node_id(node_id)
        mlflow.set_system_metrics_sampling_interval(interval_s)
        mlflow.set_system_metrics_samples_before_logging(samples_before_logging)
        try:  # continue the step count of a resumed run
            self.sampler = SystemMetricsMonitor(run_id, resume_logging=True, tracking_uri=uri)
        except Exception:  # server away now: start counting at 0
            self.sampler = SystemMetricsMonitor(run_id, tracking_uri=uri)
        self.sampler.monitors.append(ProcessMonitor())
        self.prefix = f"system/{self.sampler.node_id}/"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"vaepipe-system-metrics-{node_id}")

    def start(self) -> "RankSystemMetrics":
        self._thread.start()
        return self

    def _loop(self) -> None:
        import psutil

        psutil.cpu_percent()  # the reference of the first machine-wide CPU sample (psutil keeps one per thread)
        step = self.sampler._logging_step
        while not self._stop.is_set():
            try:
                for _ in range(int(self.sampler.samples_before_logging)):
                    # sample at the end of each interval: psutil's CPU figures are averages since
                    # the previous call, and a first call right at start-up reads 0
                    stopped = self._stop.wait(float(self.sampler.sampling_interval))
                    self.sampler.collect_metrics()
                    if stopped:
                        break
                metrics = self.sampler.aggregate_metrics()
                for monitor in self.sampler.monitors:
                    monitor.clear_metrics()
            except Exception as exc:  # a sensor that fails must not end training
                log.warning("system metrics: sampling failed (%s: %s); stopped", type(exc).__name__, exc)
                return
            self.log.metrics({self.prefix + k: v for k, v in metrics.items()}, step)
            step += 1

    def finish(self) -> None:
        """Take a last sample, stop the thread and deliver what is queued (bounded wait)."""
        self._stop.set()
        self._thread.join(timeout=60)
        self.log.flush()


def node_id(rank: int) -> str:
    """``rank<r>-<node ip>``: which rank, on which machine."""
    import ray.util

    return f"rank{rank}-{ray.util.get_node_ip_address()}"


def start_system_metrics(w: Any) -> Optional[RankSystemMetrics]:
    """Start this rank's monitor into the training run, if ``tracking.system_metrics`` is on."""
    t = w.cfg.tracking
    if not t.system_metrics:
        return None
    return RankSystemMetrics(w.log.uri, w.log.run_id, node_id(w.rank), t.system_metrics_interval_s).start()
