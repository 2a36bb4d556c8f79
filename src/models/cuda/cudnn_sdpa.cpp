// cuDNN's fused scaled-dot-product attention (the flash-attention engine torch's SDPA runs
// on Hopper) behind a small C interface, for models::cuda::cudnn_attention (issue 31, item 1:
// the route to measure beside our own flash kernel). Built by build.rs only with the `cudnn`
// feature, against NVIDIA's cudnn-frontend headers (PyPI: nvidia-cudnn-frontend) and
// libcudnn.so.9 (PyPI: nvidia-cudnn-cu13).
//
// q, k, v and the output are [b, s, h * d] (head i in columns i * d .. (i + 1) * d), the
// layout FLUX's fused q/k norm + RoPE writes: the graph takes them as [b, h, s, d] tensors
// with strides (s * h * d, d, h * d, 1), so nothing is transposed. One graph is built per
// (shape, dtype) and kept; execution is asynchronous on the caller's stream.

#include <cudnn_frontend.h>

#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>

namespace fe = cudnn_frontend;

namespace {

struct Prepared {
    std::shared_ptr<fe::graph::Graph> graph;
    std::shared_ptr<fe::graph::Tensor_attributes> q, k, v, o;
    int64_t workspace = 0;
};

// (device, b, h, s, d, dtype)
using Key = std::tuple<int, int64_t, int64_t, int64_t, int64_t, int>;

std::mutex lock;
std::map<int, cudnnHandle_t> handles;  // one per device
std::map<Key, Prepared> prepared;
thread_local std::string last_error;

int fail(std::string const &what) {
    last_error = what;
    return 1;
}

// The cuDNN handle of the device current on this thread (the caller's bound context),
// made on first use. Call with `lock` held.
int handle_for(int *device, cudnnHandle_t *handle) {
    cudaError_t current = cudaGetDevice(device);
    if (current != cudaSuccess) {
        return fail(std::string("cudaGetDevice: ") + cudaGetErrorString(current));
    }
    auto found = handles.find(*device);
    if (found != handles.end()) {
        *handle = found->second;
        return 0;
    }
    cudnnStatus_t status = cudnnCreate(handle);
    if (status != CUDNN_STATUS_SUCCESS) {
        return fail(std::string("cudnnCreate: ") + cudnnGetErrorString(status));
    }
    handles.emplace(*device, *handle);
    return 0;
}

// The attention graph for one shape and dtype (0: bf16, 1: f16), described but not built
// (building needs a device), for GPUs of compute capability `sm` (0: the current device's).
Prepared describe(int64_t b, int64_t h, int64_t s, int64_t d, int dtype, int sm) {
    Prepared p;
    p.graph = std::make_shared<fe::graph::Graph>();
    if (sm > 0) {
        // Before any node: each node takes a copy of the graph's context when it is added.
        p.graph->set_sm_version(sm);
    }
    auto io = dtype == 0 ? fe::DataType_t::BFLOAT16 : fe::DataType_t::HALF;
    p.graph->set_io_data_type(io)
        .set_intermediate_data_type(fe::DataType_t::FLOAT)
        .set_compute_data_type(fe::DataType_t::FLOAT);
    std::vector<int64_t> dims{b, h, s, d};
    std::vector<int64_t> strides{s * h * d, d, h * d, 1};
    auto tensor = [&](char const *name, int64_t uid) {
        return p.graph->tensor(fe::graph::Tensor_attributes()
                                   .set_name(name)
                                   .set_uid(uid)
                                   .set_dim(dims)
                                   .set_stride(strides));
    };
    p.q = tensor("q", 1);
    p.k = tensor("k", 2);
    p.v = tensor("v", 3);
    auto options = fe::graph::SDPA_attributes()
                       .set_name("attention")
                       .set_generate_stats(false)
                       .set_attn_scale(1.0f / std::sqrt(static_cast<float>(d)));
    auto outputs = p.graph->sdpa(p.q, p.k, p.v, options);
    p.o = outputs[0];
    p.o->set_output(true).set_uid(4).set_dim(dims).set_stride(strides);
    return p;
}

std::string shape_text(int64_t b, int64_t h, int64_t s, int64_t d) {
    return "[" + std::to_string(b) + ", " + std::to_string(h) + ", " + std::to_string(s) +
           ", " + std::to_string(d) + "]";
}

// The graph for one shape and dtype (0: bf16, 1: f16) on the current device, built on
// first use. Call with `lock` held.
int graph_for(int64_t b, int64_t h, int64_t s, int64_t d, int dtype, cudnnHandle_t *handle,
              Prepared **out) {
    int device = 0;
    if (int rc = handle_for(&device, handle)) {
        return rc;
    }
    Key key{device, b, h, s, d, dtype};
    auto found = prepared.find(key);
    if (found != prepared.end()) {
        *out = &found->second;
        return 0;
    }
    Prepared p = describe(b, h, s, d, dtype, 0);
    auto status = p.graph->build(*handle, {fe::HeurMode_t::A});
    if (!status.is_good()) {
        return fail("building cuDNN's attention graph for " + shape_text(b, h, s, d) + ": " +
                    status.get_message());
    }
    status = p.graph->get_workspace_size(p.workspace);
    if (!status.is_good()) {
        return fail("cuDNN attention workspace: " + status.get_message());
    }
    auto inserted = prepared.emplace(key, std::move(p));
    *out = &inserted.first->second;
    return 0;
}

}  // namespace

extern "C" {

// The message of the last failure on this thread.
char const *icedit_cudnn_sdpa_error() { return last_error.c_str(); }

// Checks the attention graph for this shape against cuDNN's rules for GPUs of compute
// capability `sm` (e.g. 90), on the host: no device is needed. 0 when cuDNN accepts it.
// What it cannot tell: whether an engine on the device's libcudnn runs it (that is known
// only when prepare builds it there).
int icedit_cudnn_sdpa_validate(int64_t b, int64_t h, int64_t s, int64_t d, int dtype, int sm) {
    Prepared p = describe(b, h, s, d, dtype, sm);
    auto status = p.graph->validate();
    if (!status.is_good()) {
        return fail("cuDNN refuses the attention graph for " + shape_text(b, h, s, d) +
                    " on sm_" + std::to_string(sm) + ": " + status.get_message());
    }
    return 0;
}

// Builds (once) the attention for this shape; `*workspace` gets the bytes of device
// workspace each run needs. 0 on success.
int icedit_cudnn_sdpa_prepare(int64_t b, int64_t h, int64_t s, int64_t d, int dtype,
                              int64_t *workspace) {
    std::lock_guard<std::mutex> guard(lock);
    cudnnHandle_t handle = nullptr;
    Prepared *p = nullptr;
    if (int rc = graph_for(b, h, s, d, dtype, &handle, &p)) {
        return rc;
    }
    *workspace = p->workspace;
    return 0;
}

// out = softmax(q k^T / sqrt(d)) v on `stream` (a cudaStream_t / CUstream), with a device
// workspace of at least the bytes prepare reported. 0 on success.
int icedit_cudnn_sdpa_run(int64_t b, int64_t h, int64_t s, int64_t d, int dtype, void *stream,
                          void const *q, void const *k, void const *v, void *out,
                          void *workspace) {
    std::lock_guard<std::mutex> guard(lock);
    cudnnHandle_t handle = nullptr;
    Prepared *p = nullptr;
    if (int rc = graph_for(b, h, s, d, dtype, &handle, &p)) {
        return rc;
    }
    cudnnStatus_t set = cudnnSetStream(handle, static_cast<cudaStream_t>(stream));
    if (set != CUDNN_STATUS_SUCCESS) {
        return fail(std::string("cudnnSetStream: ") + cudnnGetErrorString(set));
    }
    std::unordered_map<int64_t, void *> pointers{
        {1, const_cast<void *>(q)},
        {2, const_cast<void *>(k)},
        {3, const_cast<void *>(v)},
        {4, out},
    };
    auto status = p->graph->execute(handle, pointers, workspace);
    if (!status.is_good()) {
        return fail("cuDNN attention: " + status.get_message());
    }
    return 0;
}

}  // extern "C"
