"""Benchmarks behind ``vaepipe bench``, each measured against a baseline in the same invocation.

One module per benchmark (throughput, asha, overhead, data, scaling, memory); ``report``
prints, saves and logs what they measured; ``cli`` holds the ``vaepipe bench`` commands.
"""
