// The one pybind11 module of vlmfast: vlmfast._C. Tensors arrive as descriptors
// (data_ptr, dtype_code, sizes, strides, device) built by vlmfast/_C_loader.py::tensor_view; the Python side
// owns the tensors and keeps them alive for the duration of the call. No libtorch is linked.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <omp.h>

#include <string>

#include "calibration_bins.h"
#include "contrastive_loss.h"
#include "equal_mass_bins.h"
#include "kmeans_assign.h"
#include "prompt_logits.h"
#include "region_loss.h"
#include "tensor.h"
#include "vlmfast_build_config.h"

#ifdef VLMFAST_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace py = pybind11;
using vlmfast::CalibrationBinsArgs;
using vlmfast::DType;
using vlmfast::TensorView;

namespace {

TensorView to_view(const py::handle& obj, const char* name) {
  TensorView v;
  if (obj.is_none()) return v;  // ptr == 0: "not given"
  auto t = py::reinterpret_borrow<py::tuple>(obj);
  VLMFAST_CHECK(t.size() == 5, name, ": expected a (ptr, dtype, sizes, strides, device) descriptor");
  v.ptr = t[0].cast<std::uintptr_t>();
  const int code = t[1].cast<int>();
  VLMFAST_CHECK(code >= 0 && code <= 9, name, ": unknown dtype code ", code);
  v.dtype = static_cast<DType>(code);
  v.sizes = t[2].cast<std::vector<int64_t>>();
  v.strides = t[3].cast<std::vector<int64_t>>();
  v.device = t[4].cast<int>();
  VLMFAST_CHECK(v.sizes.size() == v.strides.size(), name, ": sizes and strides differ in length");
  return v;
}

CalibrationBinsArgs make_args(const py::object& logits, const py::object& labels, int64_t n_bins,
                              const py::object& bin_count, const py::object& bin_correct, const py::object& bin_conf,
                              const py::object& sums, const py::object& nonfinite, const py::object& sample_conf,
                              const py::object& sample_correct) {
  CalibrationBinsArgs a;
  a.logits = to_view(logits, "logits");
  a.labels = to_view(labels, "labels");
  a.n_bins = n_bins;
  a.bin_count = to_view(bin_count, "bin_count");
  a.bin_correct = to_view(bin_correct, "bin_correct");
  a.bin_conf = to_view(bin_conf, "bin_conf");
  a.sums = to_view(sums, "sums");
  a.nonfinite = to_view(nonfinite, "nonfinite");
  a.sample_conf = to_view(sample_conf, "sample_conf");
  a.sample_correct = to_view(sample_correct, "sample_correct");
  return a;
}

py::tuple cuda_device_count() {
#ifdef VLMFAST_WITH_CUDA
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error so later calls see a clean state
    return py::make_tuple(0, std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err));
  }
  return py::make_tuple(n, std::string());
#else
  return py::make_tuple(0, std::string("vlmfast._C was built without CUDA"));
#endif
}

py::dict build_info() {
  py::dict d;
  d["version"] = VLMFAST_VERSION;
  d["build_type"] = VLMFAST_BUILD_TYPE;
  d["compiler"] = VLMFAST_CXX_COMPILER;
  d["openmp"] = omp_get_max_threads();
  d["openmp_version"] = _OPENMP;
#ifdef VLMFAST_WITH_CUDA
  d["cuda"] = true;
  d["cuda_version"] = VLMFAST_CUDA_VERSION;
  d["cuda_archs"] = VLMFAST_CUDA_ARCHS;
#else
  d["cuda"] = false;
  d["cuda_version"] = py::none();
  d["cuda_archs"] = py::none();
#endif
  d["ops"] = py::make_tuple("calibration_bins", "equal_mass_bins", "prompt_logits", "contrastive_loss", "kmeans_assign",
                            "region_loss");
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "vlmfast compiled kernels (CPU with OpenMP; CUDA when built with nvcc)";
  m.attr("__version__") = VLMFAST_VERSION;
  m.def("build_info", &build_info,
        "Build facts: version, build_type, compiler, openmp (max threads), cuda (bool), cuda_version, cuda_archs, ops.");
  m.def("cuda_device_count", &cuda_device_count,
        "(count, error) from the CUDA runtime; (0, reason) when unavailable. Never raises.");

  m.def(
      "calibration_bins_cpu",
      [](const py::object& logits, const py::object& labels, int64_t n_bins, const py::object& bin_count,
         const py::object& bin_correct, const py::object& bin_conf, const py::object& sums,
         const py::object& nonfinite, const py::object& sample_conf, const py::object& sample_correct,
         int num_threads) {
        CalibrationBinsArgs a = make_args(logits, labels, n_bins, bin_count, bin_correct, bin_conf, sums, nonfinite,
                                          sample_conf, sample_correct);
        py::gil_scoped_release nogil;
        vlmfast::calibration_bins_cpu(a, num_threads);
      },
      py::arg("logits"), py::arg("labels"), py::arg("n_bins"), py::arg("bin_count"), py::arg("bin_correct"),
      py::arg("bin_conf"), py::arg("sums"), py::arg("nonfinite"), py::arg("sample_conf"), py::arg("sample_correct"),
      py::arg("num_threads") = 0,
      "Accumulate calibration bins for (M, N, C) CPU logits into zero-initialised outputs (see calibration_bins.h).");

  m.def(
      "equal_mass_bins_cpu",
      [](const py::object& conf, const py::object& correct, int64_t n_bins, const py::object& count,
         const py::object& n_correct, const py::object& conf_sum, int num_threads) {
        const TensorView c = to_view(conf, "conf"), k = to_view(correct, "correct");
        const TensorView o1 = to_view(count, "count"), o2 = to_view(n_correct, "n_correct"),
                         o3 = to_view(conf_sum, "conf_sum");
        py::gil_scoped_release nogil;
        vlmfast::equal_mass_bins_cpu(c, k, n_bins, o1, o2, o3, num_threads);
      },
      py::arg("conf"), py::arg("correct"), py::arg("n_bins"), py::arg("count"), py::arg("n_correct"),
      py::arg("conf_sum"), py::arg("num_threads") = 0,
      "Equal-mass (ACE) bins of (M, N) confidences: stable radix sort per model, groups as torch.tensor_split.");

  m.def(
      "prompt_logits_rows_fwd",
      [](const py::object& z, const py::object& labels, double label_smoothing, int64_t ignore_index,
         const py::object& loss, const py::object& lse, const py::object& conf, const py::object& pred,
         int num_threads) {
        const TensorView zv = to_view(z, "z"), yv = to_view(labels, "labels");
        const TensorView o1 = to_view(loss, "loss"), o2 = to_view(lse, "lse"), o3 = to_view(conf, "conf"),
                         o4 = to_view(pred, "pred");
        py::gil_scoped_release nogil;
        vlmfast::prompt_logits_rows_fwd_cpu(zv, yv, label_smoothing, ignore_index, o1, o2, o3, o4, num_threads);
      },
      py::arg("z"), py::arg("labels"), py::arg("label_smoothing"), py::arg("ignore_index"), py::arg("loss"),
      py::arg("lse"), py::arg("conf"), py::arg("pred"), py::arg("num_threads") = 0,
      "prompt_logits forward rows of (R, C) float32 CPU logits: loss, lse, conf, pred (see prompt_logits.h).");

  m.def(
      "prompt_logits_rows_bwd",
      [](const py::object& z, const py::object& lse, const py::object& labels, const py::object& grad,
         double label_smoothing, int64_t ignore_index, int num_threads) {
        const TensorView zv = to_view(z, "z"), lv = to_view(lse, "lse"), yv = to_view(labels, "labels"),
                         gv = to_view(grad, "grad");
        py::gil_scoped_release nogil;
        vlmfast::prompt_logits_rows_bwd_cpu(zv, lv, yv, gv, label_smoothing, ignore_index, num_threads);
      },
      py::arg("z"), py::arg("lse"), py::arg("labels"), py::arg("grad"), py::arg("label_smoothing"),
      py::arg("ignore_index"), py::arg("num_threads") = 0,
      "prompt_logits backward rows: overwrites z IN PLACE with dz (see prompt_logits.h).");

  m.def(
      "contrastive_lse_rows",
      [](const py::object& c, double scale, double bias, const py::object& lse_row, const py::object& col_max,
         const py::object& col_sum, int num_threads) {
        const TensorView cv = to_view(c, "c"), o1 = to_view(lse_row, "lse_row"), o2 = to_view(col_max, "col_max"),
                         o3 = to_view(col_sum, "col_sum");
        py::gil_scoped_release nogil;
        vlmfast::contrastive_lse_rows_cpu(cv, scale, bias, o1, o2, o3, num_threads);
      },
      py::arg("c"), py::arg("scale"), py::arg("bias"), py::arg("lse_row"), py::arg("col_max"), py::arg("col_sum"),
      py::arg("num_threads") = 0,
      "contrastive loss, one (R, B) float32 CPU cosine chunk: row lse of z = scale c + bias, and the online merge "
      "of the column (max, sum) into col_max / col_sum (see contrastive_loss.h).");

  m.def(
      "contrastive_cross_rows",
      [](const py::object& c, double scale, double bias, const py::object& ct, double tscale,
         const py::object& tlse_row, const py::object& tlse_col, const py::object& x_row, const py::object& x_col,
         int num_threads) {
        const TensorView cv = to_view(c, "c"), tv = to_view(ct, "ct"), tr = to_view(tlse_row, "tlse_row"),
                         tc = to_view(tlse_col, "tlse_col"), o1 = to_view(x_row, "x_row"),
                         o2 = to_view(x_col, "x_col");
        py::gil_scoped_release nogil;
        vlmfast::contrastive_cross_rows_cpu(cv, scale, bias, tv, tscale, tr, tc, o1, o2, num_threads);
      },
      py::arg("c"), py::arg("scale"), py::arg("bias"), py::arg("ct"), py::arg("tscale"), py::arg("tlse_row"),
      py::arg("tlse_col"), py::arg("x_row"), py::arg("x_col"), py::arg("num_threads") = 0,
      "contrastive loss, one chunk: x_row = sum_j pt z (written), x_col += sum_i qt z (accumulated), with the "
      "teacher softmaxes of tscale ct (see contrastive_loss.h).");

  m.def(
      "contrastive_grad_rows",
      [](const py::object& c, double scale, double bias, const py::object& lse_row, const py::object& lse_col,
         double alpha, double beta, const py::object& ct, double tscale, const py::object& tlse_row,
         const py::object& tlse_col, int num_threads) {
        const TensorView cv = to_view(c, "c"), lr = to_view(lse_row, "lse_row"), lc = to_view(lse_col, "lse_col");
        const TensorView tv = to_view(ct, "ct"), tr = to_view(tlse_row, "tlse_row"), tc = to_view(tlse_col, "tlse_col");
        const TensorView* tvp = ct.is_none() ? nullptr : &tv;
        const TensorView* trp = tlse_row.is_none() ? nullptr : &tr;
        const TensorView* tcp = tlse_col.is_none() ? nullptr : &tc;
        std::pair<double, double> sums;
        {
          py::gil_scoped_release nogil;
          sums = vlmfast::contrastive_grad_rows_cpu(cv, scale, bias, lr, lc, alpha, beta, tvp, tscale, trp, tcp,
                                                    num_threads);
        }
        return py::make_tuple(sums.first, sums.second);
      },
      py::arg("c"), py::arg("scale"), py::arg("bias"), py::arg("lse_row"), py::arg("lse_col"), py::arg("alpha"),
      py::arg("beta"), py::arg("ct"), py::arg("tscale"), py::arg("tlse_row"), py::arg("tlse_col"),
      py::arg("num_threads") = 0,
      "contrastive loss, one chunk: overwrites c IN PLACE with D; returns (sum D c, sum D) over the original c, "
      "in float64 (see contrastive_loss.h). ct / tlse_row / tlse_col may be None (no teacher term).");

  m.def(
      "kmeans_assign_rows",
      [](const py::object& z, const py::object& x, const py::object& xx, const py::object& cc, bool l2,
         const py::object& labels, const py::object& scores, const py::object& sums, const py::object& counts,
         int num_threads) {
        const TensorView zv = to_view(z, "z"), xv = to_view(x, "x"), xxv = to_view(xx, "xx"), ccv = to_view(cc, "cc");
        const TensorView o1 = to_view(labels, "labels"), o2 = to_view(scores, "scores"), o3 = to_view(sums, "sums"),
                         o4 = to_view(counts, "counts");
        py::gil_scoped_release nogil;
        vlmfast::kmeans_assign_rows_cpu(zv, xv, xxv, ccv, l2, o1, o2, o3, o4, num_threads);
      },
      py::arg("z"), py::arg("x"), py::arg("xx"), py::arg("cc"), py::arg("l2"), py::arg("labels"), py::arg("scores"),
      py::arg("sums"), py::arg("counts"), py::arg("num_threads") = 0,
      "k-means assignment rows of an (R, k) float32 CPU score chunk z = x @ c^T: labels, scores, and the float64 "
      "sums / int64 counts accumulated (see kmeans_assign.h). xx / cc may be None for metric ip.");

  m.def(
      "region_loss_stats_rows",
      [](const py::object& c, double inv_tau, const py::object& rel, const py::object& spu, const py::object& present,
         const py::object& m, const py::object& am, const py::object& sl, const py::object& smax,
         const py::object& sarg, int num_threads) {
        const TensorView cv = to_view(c, "c"), rv = to_view(rel, "rel"), sv = to_view(spu, "spu"),
                         pv = to_view(present, "present");
        const TensorView o1 = to_view(m, "m"), o2 = to_view(am, "am"), o3 = to_view(sl, "sl"),
                         o4 = to_view(smax, "smax"), o5 = to_view(sarg, "sarg");
        py::gil_scoped_release nogil;
        vlmfast::region_loss_stats_rows_cpu(cv, inv_tau, rv, sv, pv, o1, o2, o3, o4, o5, num_threads);
      },
      py::arg("c"), py::arg("inv_tau"), py::arg("rel"), py::arg("spu"), py::arg("present"), py::arg("m"),
      py::arg("am"), py::arg("sl"), py::arg("smax"), py::arg("sarg"), py::arg("num_threads") = 0,
      "region loss forward, one (nb, R, C) float32 CPU cosine chunk: masked max/argmax over the relevant regions, "
      "LSE over the spurious ones, best present class per region (see region_loss.h).");

  m.def(
      "region_loss_grad_rows",
      [](const py::object& c, double inv_tau, const py::object& spu, const py::object& am, const py::object& dm,
         const py::object& za, const py::object& ga, const py::object& sarg, const py::object& dsmax,
         int num_threads) {
        const TensorView cv = to_view(c, "c"), sv = to_view(spu, "spu"), av = to_view(am, "am"),
                         dv = to_view(dm, "dm"), zv = to_view(za, "za"), gv = to_view(ga, "ga"),
                         kv = to_view(sarg, "sarg"), ev = to_view(dsmax, "dsmax");
        py::gil_scoped_release nogil;
        vlmfast::region_loss_grad_rows_cpu(cv, inv_tau, sv, av, dv, zv, gv, kv, ev, num_threads);
      },
      py::arg("c"), py::arg("inv_tau"), py::arg("spu"), py::arg("am"), py::arg("dm"), py::arg("za"), py::arg("ga"),
      py::arg("sarg"), py::arg("dsmax"), py::arg("num_threads") = 0,
      "region loss backward, one chunk: overwrites c IN PLACE with dsim (see region_loss.h).");

  m.def(
      "calibration_bins_cuda",
      [](const py::object& logits, const py::object& labels, int64_t n_bins, const py::object& bin_count,
         const py::object& bin_correct, const py::object& bin_conf, const py::object& sums,
         const py::object& nonfinite, const py::object& sample_conf, const py::object& sample_correct,
         std::uintptr_t stream) {
#ifdef VLMFAST_WITH_CUDA
        CalibrationBinsArgs a = make_args(logits, labels, n_bins, bin_count, bin_correct, bin_conf, sums, nonfinite,
                                          sample_conf, sample_correct);
        py::gil_scoped_release nogil;
        vlmfast::calibration_bins_cuda(a, stream);
#else
        throw std::runtime_error("vlmfast._C was built without CUDA (no nvcc at build time)");
#endif
      },
      py::arg("logits"), py::arg("labels"), py::arg("n_bins"), py::arg("bin_count"), py::arg("bin_correct"),
      py::arg("bin_conf"), py::arg("sums"), py::arg("nonfinite"), py::arg("sample_conf"), py::arg("sample_correct"),
      py::arg("stream") = 0,
      "Same as calibration_bins_cpu for CUDA tensors, launched asynchronously on `stream`.");
}
