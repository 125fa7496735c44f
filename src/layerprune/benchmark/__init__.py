"""What pruning buys: parameters, MACs, memory, prefill latency and generation speed.

config: the settings; inputs: the tokens; macs, memory, latency: one measurement each (their
docstrings say how, and the limits); measure: the whole benchmark of one model; compare: original vs
pruned; render: bench.json, bench.md and bench.png.
"""

from layerprune.benchmark.compare import compare, figures
from layerprune.benchmark.config import BenchConfig
from layerprune.benchmark.inputs import PROMPT_TOKENS, token_stream
from layerprune.benchmark.latency import generation_latency, prefill_latency
from layerprune.benchmark.macs import count_macs, decode_macs
from layerprune.benchmark.memory import measure_memory, weight_memory
from layerprune.benchmark.render import markdown, table_rows, write_outputs
from layerprune.benchmark.measure import benchmark

__all__ = [
    "PROMPT_TOKENS", "BenchConfig", "benchmark", "compare", "count_macs", "decode_macs", "figures",
    "generation_latency", "markdown", "measure_memory", "prefill_latency", "table_rows", "token_stream",
    "weight_memory", "write_outputs",
]
