"""Benchmark data: CounterFact and zsRE records and their loaders.

Both record types offer the same scoring interface (``case_id``, ``subject``,
``request``, ``target_new``, ``target_true``, ``paraphrase_prompts``,
``neighborhood_prompts``, ``neighborhood_target(i)``, ``generation_prompts``),
which is all :func:`editkit.metrics.evaluate` relies on.
"""
from ._common import DatasetUnavailableError, data_cache_dir
from .counterfact import COUNTERFACT_URLS, CounterFactRecord, load_counterfact
from .zsre import ZSRE_URLS, ZsreRecord, load_zsre

__all__ = ["CounterFactRecord", "ZsreRecord", "load_counterfact", "load_zsre", "DatasetUnavailableError",
           "data_cache_dir", "COUNTERFACT_URLS", "ZSRE_URLS"]
