"""finlora's commitment layer: Pedersen/Hyrax commitments on quantized LoRA updates, Ed25519 signatures,
server-side verification before aggregation, a ledger, and an audit. Pure Python + crypto (no torch, no flwr).

Client, per round (``norm_bound``, ``frac_bits``, ``bits`` announced by the server)::

    values, layout = encoding.quantize_update(delta, norm_bound, frac_bits, bits, rng)   # delta = local - global
    sub = verify.make_submission(values, num_examples, private_key, run_id, round_num, node_id)
    record = sub.to_wire(bits)   # {"values": int8/int16 array, "num_examples", "commitments", "blindings",
                                 #  "signature"} -> ArrayRecord + ConfigRecord

Server, at start: ``keys = signing.load_key_registry(path)``; save the round-0 adapter; then
``ledger.append_entry(run_dir, ledger.header_entry(run_id, keys, ledger.file_sha256(round0), norm_bound,
frac_bits, bits))``; ``seen_digests = ledger.seen_digests(run_dir)`` (empty on a fresh run, rebuilt on
resume). Per round::

    subs = [verify.Submission.from_wire(node_id, record) for ...]          # ValueError -> reject as malformed
    accepted, rejected = verify.verify_round(subs, run_id, round_num, keys, norm_bound, frac_bits, bits,
                                             seen_digests, expected_size=layout.size)
    seen_digests.update(s.digest for s in accepted)
    A, R_rows, N = verify.aggregate(accepted)
    new_global = encoding.apply_aggregate(prev_global, A, layout, N, frac_bits)   # save to round-<k>/...
    ledger.record_round(run_dir, round_num, layout, accepted, rejected, A, R_rows, N)

Audit: ``audit.audit_run(run_dir) -> list[RoundVerdict]``; CLI ``cli.add_zk_parser(subparsers)`` adds
``finlora zk audit RUN_DIR`` (``python -m finlora.zk.cli audit RUN_DIR`` standalone).

Modules: ``encoding`` (Layout, quantize_update, dequantize, apply_aggregate), ``generators`` (pinned Pedersen
generators), ``commit`` (commit_rows, commitments_digest, batched opening checks), ``signing`` (keys, registry,
update_statement, sign, verify), ``wire`` (byte encodings), ``verify`` (Submission, verify_round, aggregate),
``ledger``, ``audit``, ``cli``.
"""
