"""Which TorchScript operators a model file may run: an allowlist of operators that compute.

TorchScript is a programming language. `torch.from_file(path, shared=True, size)` alone reads
and writes any file the process can reach, and a `raise` carries what it read back out; a
custom-op namespace can reach any C++ library that is loaded. So before anything of an
untrusted model runs, every graph it holds is walked (all methods of all submodules, forward
hooks, every nested block, every function or method they call) and each operator is checked
against this list: aten/prim tensor math, shapes, indexing, random numbers, control flow, and
the list/tuple/dict/int/float/str operations TorchScript code needs. Nothing is allowed for
being absent from a denylist: an operator a new torch release adds is refused until it is
reviewed and listed here.

Loading a TorchScript archive already runs code: `torch.jit.load` calls the `__setstate__`
method of every scripted object it unpickles, and torchbind classes (`torch.classes.*`) run
their C++ `__setstate__`. `check_torchscript_archive` refuses both from the archive's bytes,
before `torch.jit.load`; `check_torchscript_module` checks the loaded graphs.
"""

from __future__ import annotations

import io
import re
import zipfile
import zlib
from pathlib import Path

import torch

from gradprobe.diagnostics.errors import ModelLoadError, UnsupportedOperator

# Names that reach an error message may come from the model file: keep them short.
_MAX_NAME = 200


def _names(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Structure of TorchScript code: constants, control flow, containers, attribute access,
# calls (whose targets are checked too), exceptions, type refinement and tensor metadata.
# Not here: prim::PythonOp/IgnoredPythonOp (Python callbacks), prim::Print, prim::fork and
# awaitables (threads), prim::rpc_* (network), profiling and fusion-group nodes.
_PRIM = _names('''
AutogradAdd AutogradZero BroadcastSizes CallFunction CallMethod ConstantChunk Constant
CreateObject DictConstruct DictIndex EnumName EnumValue Enter Exit GetAttr If
ImplicitTensorToNum ListConstruct ListUnpack Loop ModuleContainerIndex NumToTensor
RaiseException SetAttr StringIndex TupleConstruct TupleIndex TupleSlice TupleUnpack
Uninitialized abs data device dtype grad index is_cpu is_cuda is_meta is_mkldnn is_nested
is_quantized is_sparse is_sparse_csr isinstance itemsize layout max min name nbytes rangelist
requires_grad shape tolist type unchecked_cast unchecked_unwrap_optional
''')

# aten operators that compute on tensors and on the scalars, strings and containers that
# TorchScript code handles. Not here: from_file, save, set_ (rebinds storage), storage and
# data-pointer access, RPC/distributed (to_here, owner, wait), seeding the global generator,
# printing, backend-internal kernels (cudnn/miopen/mkldnn/fbgemm/quantized), *_backward.
_ATEN_PUBLIC = _names('''
tril_indices triu_indices
Bool Complex ComplexImplicit Delete Float FloatImplicit Int IntImplicit ScalarImplicit Size __and__
__contains__ __getitem__ __iand__ __ilshift__ __ior__ __irshift__ __is__ __isnot__ __ixor__
__lshift__ __not__ __or__ __rshift__ __xor__ abs abs_ absolute absolute_ acos acos_ acosh acosh_
adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d
adaptive_max_pool3d add add_ addbmm addbmm_ addcdiv addcdiv_ addcmul addcmul_ addmm addmm_ addmv
addmv_ addr addr_ adjoint affine_grid_generator alias all allclose alpha_dropout alpha_dropout_
amax amin aminmax angle any append arange arccos arccos_ arccosh arccosh_ arcsin arcsin_ arcsinh
arcsinh_ arctan arctan2 arctan2_ arctan_ arctanh arctanh_ argmax argmin argsort argwhere as_strided
as_strided_ as_strided_scatter as_tensor asin asin_ asinh asinh_ atan atan2 atan2_ atan_ atanh
atanh_ atleast_1d atleast_2d atleast_3d avg_pool1d avg_pool2d avg_pool3d baddbmm baddbmm_
bartlett_window batch_norm batch_norm_elemt batch_norm_gather_stats
batch_norm_gather_stats_with_counts batch_norm_stats batch_norm_update_stats bernoulli bernoulli_
bilinear binary_cross_entropy binary_cross_entropy_with_logits bincount binomial bitwise_and
bitwise_and_ bitwise_left_shift bitwise_left_shift_ bitwise_not bitwise_not_ bitwise_or bitwise_or_
bitwise_right_shift bitwise_right_shift_ bitwise_xor bitwise_xor_ blackman_window block_diag bmm
broadcast_shapes broadcast_tensors broadcast_to bucketize capitalize cartesian_prod cat cauchy
cauchy_ cdist ceil ceil_ celu celu_ center chain_matmul chalf channel_shuffle cholesky_inverse
cholesky_solve chunk clamp clamp_ clamp_max clamp_max_ clamp_min clamp_min_ clear clip clip_ clone
col2im column_stack combinations complex concat concatenate conj conj_physical conj_physical_
constant_pad_nd contiguous conv1d conv2d conv3d conv_tbc conv_transpose1d conv_transpose2d
conv_transpose3d convolution copy copy_ copysign copysign_ corrcoef cos cos_ cosh cosh_
cosine_embedding_loss cosine_similarity count count_nonzero cov cpu cross cross_entropy_loss
ctc_loss cummax cummin cumprod cumprod_ cumsum cumsum_ cumulative_trapezoid data deg2rad deg2rad_
degrees det detach detach_ device diag diag_embed diagflat diagonal diagonal_scatter dict diff
digamma digamma_ dim dist div div_ divide divide_ divmod dot dropout dropout_ dsplit dstack einsum
element_size elu elu_ embedding embedding_bag embedding_renorm embedding_renorm_ empty empty_like
empty_permuted empty_strided endswith eq eq_ equal erf erf_ erfc erfc_ erfinv erfinv_ exp exp2
exp2_ exp_ expand expand_as expandtabs expm1 expm1_ exponential exponential_ extend eye fabs
factorial feature_alpha_dropout feature_alpha_dropout_ feature_dropout feature_dropout_ fft_fft
fft_fft2 fft_fftfreq fft_fftn fft_fftshift fft_hfft fft_hfft2 fft_hfftn fft_ifft fft_ifft2
fft_ifftn fft_ifftshift fft_ihfft fft_ihfft2 fft_ihfftn fft_irfft fft_irfft2 fft_irfftn fft_rfft
fft_rfft2 fft_rfftfreq fft_rfftn fill fill_ fill_diagonal_ find fix fix_ flatten
flatten_dense_tensors flip fliplr flipud float_power float_power_ floor floor_ floor_divide
floor_divide_ floordiv fmax fmin fmod fmod_ format frac frac_ fractional_max_pool2d
fractional_max_pool3d frexp frobenius_norm full full_like gamma gather gcd gcd_ ge ge_ gelu gelu_
geometric geometric_ geqrf ger get get_autocast_dtype get_device glu glu_jvp grad gradient greater
greater_ greater_equal greater_equal_ grid_sampler grid_sampler_2d grid_sampler_3d group_norm gru
gru_cell gt gt_ hamming_window hann_window hardshrink hardsigmoid hardsigmoid_ hardswish hardswish_
hardtanh hardtanh_ hash hash_tensor heaviside heaviside_ hinge_embedding_loss histc histogram
histogramdd hsplit hstack huber_loss hypot hypot_ i0 i0_ igamma igamma_ igammac igammac_ im2col
imag index index_add index_add_ index_copy index_copy_ index_fill index_fill_ index_put index_put_
index_reduce index_reduce_ index_select indices inner insert instance_norm inverse
is_autocast_cpu_enabled is_autocast_enabled is_complex is_conj is_contiguous is_floating_point
is_grad_enabled is_inference is_leaf is_neg is_non_overlapping_and_dense is_nonzero is_same_size
is_scripting is_signed is_strides_like_format isalnum isalpha isclose isdecimal isdigit isfinite
isidentifier isin isinf islower isnan isneginf isnumeric isposinf isprintable isreal isspace istft
istitle isupper item items join kaiser_window keys kl_div kron kthvalue l1_loss layer_norm lcm lcm_
ldexp ldexp_ le le_ leaky_relu leaky_relu_ len lerp lerp_ less less_ less_equal less_equal_ lgamma
lgamma_ linalg__powsum linalg_cholesky linalg_cholesky_ex linalg_cond linalg_cross linalg_det
linalg_diagonal linalg_eig linalg_eigh linalg_eigvals linalg_eigvalsh linalg_householder_product
linalg_inv linalg_inv_ex linalg_ldl_factor linalg_ldl_factor_ex linalg_ldl_solve linalg_lstsq
linalg_lu linalg_lu_factor linalg_lu_factor_ex linalg_lu_solve linalg_matmul linalg_matrix_exp
linalg_matrix_norm linalg_matrix_power linalg_matrix_rank linalg_matrix_sqrth linalg_multi_dot
linalg_norm linalg_pinv linalg_polar linalg_qr linalg_slogdet linalg_solve linalg_solve_ex
linalg_solve_triangular linalg_svd linalg_svdvals linalg_tensorinv linalg_tensorsolve linalg_vander
linalg_vecdot linalg_vector_norm linear linspace list ljust log log10 log10_ log1p log1p_ log2
log2_ log_ log_normal log_normal_ log_sigmoid log_sigmoid_forward log_softmax logaddexp logaddexp2
logcumsumexp logdet logical_and logical_and_ logical_not logical_not_ logical_or logical_or_
logical_xor logical_xor_ logit logit_ logspace logsumexp lower lstm lstm_cell lstrip lt lt_
lu_solve lu_unpack mH mT margin_ranking_loss masked_fill masked_fill_ masked_scatter
masked_scatter_ masked_select mathremainder matmul matrix_H matrix_exp matrix_power max max_pool1d
max_pool2d max_pool3d max_unpool2d max_unpool3d maximum mean median meshgrid min minimum mish mish_
mm mode modf moveaxis movedim mse_loss msort mul mul_ multi_margin_loss multilabel_margin_loss
multilabel_margin_loss_forward multinomial multiply multiply_ mv mvlgamma mvlgamma_ nan_to_num
nan_to_num_ nanmean nanmedian nanquantile nansum narrow native_batch_norm native_channel_shuffle
native_dropout native_group_norm native_layer_norm native_norm ne ne_ neg neg_ negative negative_
new_empty new_empty_strided new_full new_ones new_zeros nextafter nextafter_ nll_loss nll_loss2d
nll_loss2d_forward nll_loss_forward nll_loss_nd nonzero nonzero_numpy nonzero_static norm
norm_except_dim normal normal_ normal_functional not_equal not_equal_ nuclear_norm numel numpy_T
one_hot ones ones_like orgqr ormqr outer output_nr pad pad_sequence pairwise_distance partition
pdist percentFormat permute pinverse pixel_shuffle pixel_unshuffle poisson poisson_nll_loss polar
polygamma polygamma_ pop popitem positive pow pow_ prelu prod put put_ quantile rad2deg rad2deg_
radians rand rand_like randint randint_like randn randn_like random random_ randperm range ravel
real reciprocal reciprocal_ reflection_pad1d reflection_pad2d reflection_pad3d relu relu6 relu6_
relu_ remainder remainder_ remove renorm renorm_ repeat repeat_interleave replace replication_pad1d
replication_pad2d replication_pad3d requires_grad_ reshape reshape_as resize resize_ resize_as
resize_as_ resolve_conj resolve_neg result_type retain_grad retains_grad reverse rfind rindex rjust
rms_norm rnn_relu rnn_relu_cell rnn_tanh rnn_tanh_cell roll rot90 round round_ row_stack rpartition
rrelu rrelu_ rrelu_with_noise rrelu_with_noise_ rrelu_with_noise_functional rsplit rsqrt rsqrt_
rstrip rsub scalar_tensor scaled_dot_product_attention scatter scatter_ scatter_add scatter_add_
scatter_reduce scatter_reduce_ searchsorted select select_scatter selu selu_ set set_grad_enabled
setdefault sgn sgn_ sigmoid sigmoid_ sign sign_ signbit silu silu_ sin sin_ sinc sinc_ sinh sinh_
size slice slice_inverse slice_scatter slogdet smooth_l1_loss soft_margin_loss softmax softplus
softshrink sort sorted special_airy_ai special_bessel_j0 special_bessel_j1 special_bessel_y0
special_bessel_y1 special_chebyshev_polynomial_t special_chebyshev_polynomial_u
special_chebyshev_polynomial_v special_chebyshev_polynomial_w special_digamma special_entr
special_erf special_erfc special_erfcx special_erfinv special_exp2 special_expit special_expm1
special_gammainc special_gammaincc special_gammaln special_hermite_polynomial_h
special_hermite_polynomial_he special_i0 special_i0e special_i1 special_i1e
special_laguerre_polynomial_l special_legendre_polynomial_p special_log1p special_log_ndtr
special_log_softmax special_logit special_logsumexp special_modified_bessel_i0
special_modified_bessel_i1 special_modified_bessel_k0 special_modified_bessel_k1
special_multigammaln special_ndtr special_ndtri special_polygamma special_psi special_round
special_scaled_modified_bessel_k0 special_scaled_modified_bessel_k1
special_shifted_chebyshev_polynomial_t special_shifted_chebyshev_polynomial_u
special_shifted_chebyshev_polynomial_v special_shifted_chebyshev_polynomial_w special_sinc
special_softmax special_spherical_bessel_j0 special_xlog1py special_xlogy special_zeta split
split_with_sizes splitlines sqrt sqrt_ square square_ squeeze squeeze_ stack startswith std
std_mean stft str stride strip sub sub_ subtract subtract_ sum sum_to_size svd swapaxes swapaxes_
swapcase swapdims swapdims_ t t_ take take_along_dim tan tan_ tanh tanh_ tensor tensor_split
tensordot threshold threshold_ tile title to to_padded_tensor topk trace transpose transpose_
trapezoid trapz triangular_solve tril tril_ triplet_margin_loss triu triu_ true_divide true_divide_
trunc trunc_ type_as unbind unflatten unflatten_dense_tensors unfold uniform uniform_
unique_consecutive unique_dim unique_dim_consecutive unsafe_chunk unsafe_split
unsafe_split_with_sizes unsqueeze unsqueeze_ update upper upsample_bicubic2d upsample_bilinear2d
upsample_linear1d upsample_nearest1d upsample_nearest2d upsample_nearest3d upsample_trilinear3d
values vander var var_mean vdot view view_as view_as_complex view_as_real vsplit vstack warn where
xlogy xlogy_ zero zero_ zeros zeros_like zfill
''')
_ATEN_PRIVATE = _names('''
__interpolate __upsample __upsample_bilinear _addmm_activation _assert_async _assert_scalar
_assert_tensor_metadata _autocast_to_full_precision _autocast_to_reduced_precision
_batch_norm_impl_index _cast_Float _cast_Half _cast_Int _cast_Long _conj _convolution
_convolution_mode _dim_arange _embedding_bag _fused_sdp_choice _get_tracing_state
_grid_sampler_2d_cpu_fallback _grouped_mm _infer_size _is_all_true _is_any_true _list_to_tensor
_log_softmax
_masked_softmax _native_batch_norm_legit _native_multi_head_attention _ncf_unsqueeze _ncf_view
_neg_view _nested_tensor_from_mask _nested_tensor_from_mask_left_aligned
_nested_tensor_from_tensor_list _no_grad_fill_ _no_grad_normal_ _no_grad_uniform_ _no_grad_zero_
_pack_padded_sequence _pad_circular _pad_enum _pad_packed_sequence _reshape_alias _safe_softmax
_scaled_dot_product_attention_math _scaled_dot_product_efficient_attention
_scaled_dot_product_flash_attention _scaled_dot_product_flash_attention_for_cpu _set_item
_shape_as_tensor _size_if_not_equal _softmax _tensor_to_list _thnn_fused_gru_cell
_thnn_fused_lstm_cell _to_copy _transformer_encoder_layer_fwd _unique _unique2 _unsafe_view
_unwrap_optional _upsample_bicubic2d_aa _upsample_bilinear2d_aa _upsample_nearest_exact1d
_upsample_nearest_exact2d _upsample_nearest_exact3d _weight_norm _weight_norm_interface
''')

_ALLOWED = frozenset({f"prim::{n}" for n in _PRIM}
                     | {f"aten::{n}" for n in _ATEN_PUBLIC | _ATEN_PRIVATE})

# torchbind classes are C++ code whose constructors and __setstate__ do whatever their
# library does (c10d stores open files and sockets); a scripted object of a TorchScript class
# is plain TorchScript whose methods are inlined and checked like any other code.
_TORCHBIND_PREFIX = "__torch__.torch.classes."
_SETSTATE = re.compile(rb"\b__setstate__\b")


def is_allowed_torch_op(qualified_name: str) -> bool:
    """Whether a TorchScript/aten operator (`aten::add`, `prim::If`; an overload name after a
    dot is ignored) is one that only computes. Every other namespace is refused."""
    base = qualified_name.split(".", 1)[0] if "::" in qualified_name else qualified_name
    return base in _ALLOWED


def check_torchscript_archive(source: Path | bytes, where: str) -> None:
    """Refuse, from the archive's bytes and before `torch.jit.load` runs anything, the code
    that loading itself would run: scripted `__setstate__` methods and torchbind classes."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source)
    except (zipfile.BadZipFile, OSError):
        return  # not a zip: torch.jit.load refuses it without running anything
    with archive:
        for info in archive.infolist():
            name = info.filename
            if not (name.endswith(".py") or name.endswith(".pkl")) or name.endswith("debug_pkl"):
                continue
            try:
                content = archive.read(info)
            except (zipfile.BadZipFile, zlib.error, OSError, EOFError, RuntimeError,
                    NotImplementedError) as exc:  # corrupt, encrypted, odd compression
                raise ModelLoadError(f"{where}: truncated or corrupt zip archive "
                                     f"({_short(str(exc))})") from None
            if name.endswith(".py") and _SETSTATE.search(content):
                raise UnsupportedOperator(
                    "__setstate__", f"{where}: {_short(name)}",
                    "torch.jit.load would run this method; save the module without a custom "
                    "__setstate__")
            if b"torch.classes." in content:
                raise UnsupportedOperator(
                    "torch.classes", f"{where}: {_short(name)}",
                    "a torchbind (C++) class is not tensor math that can be checked")


def check_torchscript_module(module: torch.jit.ScriptModule, where: str) -> None:
    """Walk every graph of a loaded TorchScript module and raise UnsupportedOperator naming
    the first operator that is not on the allowlist and where it is (module path, method)."""
    for path, submodule in module.named_modules():
        scripted = submodule._c
        owner = f"{where}:{path or '<root>'}"
        for method_name in scripted._method_names():
            _check_graph(scripted._get_method(method_name).graph, f"{owner}.{method_name}")
        for hook in [*scripted._get_forward_pre_hooks(), *scripted._get_forward_hooks()]:
            _check_graph(hook.graph, f"{owner}.{hook.name}")


def _check_graph(graph: torch._C.Graph, where: str) -> None:
    # Inlining resolves every call of a TorchScript function or of a method of a scripted
    # class or submodule into its body, so the walk sees the operators that will run.
    inlined = graph.copy()
    torch._C._jit_pass_inline(inlined)
    _check_block(inlined.block(), where)


def _check_block(block: torch._C.Block, where: str) -> None:
    for node in block.nodes():
        kind = node.kind()
        if not is_allowed_torch_op(kind):
            raise UnsupportedOperator(_short(kind), where, _source_line(node))
        if kind == "prim::CallFunction":  # inlining left it: not a TorchScript function
            raise UnsupportedOperator(kind, where, "a call whose target cannot be checked")
        if kind == "prim::CallMethod":
            receiver = node.inputsAt(0).type()
            # an interface's implementations are submodules, whose methods are walked too
            if not (hasattr(receiver, "is_interface_type") and receiver.is_interface_type()):
                raise UnsupportedOperator(f"{kind} {_short(node.s('name'))}", where,
                                          f"a method of {_short(receiver.annotation_str)}")
        if kind == "prim::CreateObject" and \
                node.output().type().annotation_str.startswith(_TORCHBIND_PREFIX):
            raise UnsupportedOperator(_short(node.output().type().annotation_str), where,
                                      "a torchbind (C++) class")
        for inner in node.blocks():
            _check_block(inner, where)
        for attribute in node.attributeNames():  # subgraphs carried as attributes
            if node.kindOf(attribute) == "g":
                _check_block(node.g(attribute).block(), where)


def _source_line(node: torch._C.Node) -> str:
    # the range reads: File "<where it was scripted>", line N / the code line / a marker
    lines = [line.strip() for line in node.sourceRange().splitlines() if line.strip()]
    code = [line for line in lines if not line.startswith("File ") and "~~~" not in line]
    return f"in `{_short(code[0])}`" if code else ""


def _short(text: str) -> str:
    return text if len(text) <= _MAX_NAME else text[:_MAX_NAME] + "..."
