"""What pruning buys: parameters, MACs, memory, prefill latency and generation speed.

config: the settings; inputs: the tokens; macs, memory, latency: one measurement each (their
docstrings say how, and the limits); measure: the whole benchmark of one model; compare: original vs
pruned; render: bench.json, bench.md and bench.png.
"""

from layerprune.common.lazy import lazy_exports

_PUBLIC = {
    "compare": "layerprune.benchmark.compare",
    "figures": "layerprune.benchmark.compare",
    "BenchConfig": "layerprune.benchmark.config",
    "PROMPT_TOKENS": "layerprune.benchmark.inputs",
    "token_stream": "layerprune.benchmark.inputs",
    "generation_latency": "layerprune.benchmark.latency",
    "prefill_latency": "layerprune.benchmark.latency",
    "count_macs": "layerprune.benchmark.macs",
    "decode_macs": "layerprune.benchmark.macs",
    "measure_memory": "layerprune.benchmark.memory",
    "weight_memory": "layerprune.benchmark.memory",
    "markdown": "layerprune.benchmark.render",
    "table_rows": "layerprune.benchmark.render",
    "write_outputs": "layerprune.benchmark.render",
    "benchmark": "layerprune.benchmark.measure",
}
__all__ = sorted(_PUBLIC)
__getattr__, __dir__ = lazy_exports(globals(), _PUBLIC)  # the names load on first use: BenchConfig alone stays light
