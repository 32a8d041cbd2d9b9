"""The runtime toolkit: small helpers every stage shares, each with one home.

    lmstack.runtime.device      resolve_device / resolve_dtype / pick_device: what "auto" means
    lmstack.runtime.validation  check_choices / check_choice / need / check_range / check_int / check_number

The KV-cache bytes formula lives beside the parameter counts (lmstack.model.counting.kv_bytes_per_token)
and the one guarded JSON reader beside the other untrusted-file checks (lmstack.model.load_guard).
"""
