"""The engine: token ids in, token ids out. One step (prefill, hand-off, decode, sampling, refresh)
under a static batch (`BatchDecoder`) and a continuous one (`ContinuousBatcher`)."""
from .batch import BatchDecoder
from .continuous import ContinuousBatcher, Job, Stats, TokenEvent, WarmedVariant
from .sampling import Sampler, SamplingParams, sample
from .step import (CompiledStep, compile_count, decode_one_token, decode_step, finish_reason, first_token, left_pad,
                   one_row_product_options, prefill, refresh, use_compile_cache)

__all__ = ["BatchDecoder", "CompiledStep", "ContinuousBatcher", "Job", "Sampler", "SamplingParams", "Stats",
           "TokenEvent", "WarmedVariant", "compile_count", "decode_one_token", "decode_step", "finish_reason",
           "first_token", "left_pad", "one_row_product_options", "prefill", "refresh", "sample", "use_compile_cache"]
