"""Adapters that run code written against other frameworks' parallelism APIs on parallelkit.

``parallelkit.compat.megatron``: Megatron-core's (and apex.transformer's) ``parallel_state`` and
``tensor_parallel`` names, backed by ``parallelkit.mpu`` and parallelkit's layers.
"""
