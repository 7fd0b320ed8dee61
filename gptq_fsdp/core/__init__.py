"""GPTQ's math on tensors: no modules, no torch.distributed.

`gptq.gptq_quantize` quantizes one weight given its Hessian; `hessian` sums XᵀX; `scheme` holds the
compressed-tensors quantization rules; `scales` the searched scales (observer mse / imatrix_mse);
`linalg` the factorizations and the column loop; `reference` a plain float64 GPTQ that the tests
hold the fast one against.
"""
