"""Process groups and the collectives that run on them.

``rank_groups`` is the pure layout arithmetic, ``mpu`` owns the groups of one process, ``comm`` is
the one place that calls collectives.
"""
