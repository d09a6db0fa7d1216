"""`python -m bench.profile`: where the server's kernel time per IO goes. Several server variants
(ring setup flags), null_blk beside them, preemption modes, all in one guest session, interleaved;
then `perf stat` and `perf record -g` of each on the flavour's `profile` image."""
