//! CUDA graphs: one forward captured once and replayed with a single launch (issue 31,
//! item 4).
//!
//! candle launches every tensor operation from the host, one at a time: a full-size FLUX
//! step is a few thousand launches, each costing host time that the GPU may wait on. A graph
//! records those launches once and replays them all with one host call. What capture needs
//! from candle 0.11, and how [`CapturedForward::capture`] meets it:
//! - **No host copies while capturing.** Small uploads (the shape/stride parameters of
//!   non-contiguous kernels, tiny constant tensors) are served by candle's capture cache
//!   (`CudaDevice::enable_cuda_graph_htod_cache`), which a warm-up run under the same guard
//!   fills; an upload it cannot serve, or a read back to the host, fails the capture with
//!   candle's error and the caller runs eagerly.
//! - **Stream-ordered allocation.** candle allocates with `cuMemAllocAsync`, so the
//!   forward's buffers become the graph's own memory nodes (freed inside the graph when the
//!   forward drops them). The one it keeps, the output, stays allocated after a replay; the
//!   graph is instantiated with `AUTO_FREE_ON_LAUNCH`, so the next replay frees and rewrites
//!   it: read (copy) the output before launching again.
//! - **Nothing created lazily inside the capture.** cuBLASLt plans and workspaces, the fp8
//!   scale vectors and candle's loaded modules exist once the warm-up run has made them.
//!
//! Inputs are read from the buffers the capture saw: to replay on new values, write them
//! into those buffers first (see [`crate::models::flux::graph_step`]). Off CUDA, or without
//! the `cuda` feature, capture is an error and callers run the forward as it is.

use candle_core::{Device, Result, Tensor};
use serde::Serialize;

/// What a captured graph holds, by node type: the launches one replay makes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct GraphNodes {
    /// Kernel launches (ours, candle's, cuBLAS's).
    pub kernels: usize,
    /// Device memory copies.
    pub memcpys: usize,
    /// Memory sets (zeroed buffers).
    pub memsets: usize,
    /// Stream-ordered allocations the graph makes.
    pub allocs: usize,
    /// ... and frees.
    pub frees: usize,
    /// Anything else (events, empty nodes, child graphs).
    pub other: usize,
}

impl GraphNodes {
    /// Work the GPU is given per replay: kernels, copies and memsets (what an eager forward
    /// launches one by one).
    pub fn launches(&self) -> usize {
        self.kernels + self.memcpys + self.memsets
    }
}

/// A forward captured as a CUDA graph, with the output tensor its replays write.
pub struct CapturedForward {
    // Declared before `graph`: the output (graph memory) is released before the graph.
    output: Tensor,
    nodes: GraphNodes,
    #[cfg(feature = "cuda")]
    graph: imp::Graph,
}

impl std::fmt::Debug for CapturedForward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CapturedForward")
            .field("output", &self.output.shape())
            .field("nodes", &self.nodes)
            .finish()
    }
}

impl CapturedForward {
    /// Runs `forward` once eagerly (the warm-up that creates every lazily made buffer and
    /// fills candle's capture cache), then captures a second call as a graph. Returns the
    /// warm-up's output (a real result: the capture itself computes nothing) and the graph.
    ///
    /// `forward` must read its inputs from tensors that outlive the graph and that the
    /// caller rewrites in place between replays. An error while capturing ends the capture
    /// and is returned; the device is usable afterwards.
    pub fn capture(
        device: &Device,
        mut forward: impl FnMut() -> Result<Tensor>,
    ) -> Result<(Tensor, Self)> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(dev) = device {
            let (warm, output, nodes, graph) = imp::capture(dev, &mut forward)?;
            return Ok((
                warm,
                Self {
                    output,
                    nodes,
                    graph,
                },
            ));
        }
        let _ = &mut forward;
        candle_core::bail!(
            "CUDA graphs need a CUDA device and a build with `--features cuda` (device {:?})",
            device.location()
        )
    }

    /// Replays the graph on the stream it was captured on (asynchronously). The previous
    /// replay's output is overwritten.
    pub fn launch(&self) -> Result<()> {
        #[cfg(feature = "cuda")]
        return self.graph.launch();
        #[cfg(not(feature = "cuda"))]
        unreachable!("a CapturedForward exists only on CUDA")
    }

    /// The output the replays write (valid after [`Self::launch`] until the next launch).
    pub fn output(&self) -> &Tensor {
        &self.output
    }

    /// The graph's nodes by type.
    pub fn nodes(&self) -> GraphNodes {
        self.nodes
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use std::sync::Arc;

    use candle_core::cuda_backend::cudarc::driver::sys::{
        self, CUgraphInstantiate_flags, CUgraphNodeType, CUstreamCaptureMode,
    };
    use candle_core::cuda_backend::cudarc::driver::{CudaGraph, CudaStream};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaDevice, Result, Tensor};

    use super::GraphNodes;

    /// The instantiated graph; on drop its memory pool is trimmed, so that the buffers
    /// it reserved go back to the device.
    pub struct Graph {
        graph: Option<CudaGraph>,
        stream: Arc<CudaStream>,
    }

    // SAFETY: a graph may be launched from any thread as long as calls on it are not
    // concurrent; `Graph` is not `Sync`, so its owner serialises them. (candle's stream is
    // the calling thread's default stream: a replay runs on the stream of the thread that
    // launches it, where that thread's own writes of the inputs were queued.)
    unsafe impl Send for Graph {}

    impl Graph {
        pub fn launch(&self) -> Result<()> {
            self.graph
                .as_ref()
                .expect("graph present until drop")
                .launch()
                .w()
        }
    }

    impl Drop for Graph {
        fn drop(&mut self) {
            drop(self.graph.take());
            // Best effort: the pool's unused memory returns to the device once the frees
            // queued before (the output's) have run.
            let ctx = self.stream.context();
            if self.stream.synchronize().is_ok() {
                // SAFETY: a plain driver call on this context's device.
                let _ = unsafe { sys::cuDeviceGraphMemTrim(ctx.cu_device()) };
            }
        }
    }

    pub fn capture(
        dev: &CudaDevice,
        forward: &mut dyn FnMut() -> Result<Tensor>,
    ) -> Result<(Tensor, Tensor, GraphNodes, Graph)> {
        let stream = dev.cuda_stream();
        // Held through the warm-up and the capture: the warm-up fills the cache the
        // capture reads small uploads from.
        let _cache = dev.enable_cuda_graph_htod_cache();
        let warm = forward()?;
        stream.synchronize().w()?;
        // Thread-local mode: only this thread's unsafe calls (a synchronous copy, a
        // cuMemAlloc) break the capture; other threads keep working.
        stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .w()?;
        let captured = forward();
        // End the capture whatever happened, so the stream leaves capture mode.
        let ended = stream
            .end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
        let (output, graph) = match (captured, ended) {
            (Ok(output), Ok(Some(graph))) => (output, graph),
            (captured, ended) => {
                let why = match (&captured, &ended) {
                    (Err(e), _) => e.to_string(),
                    (_, Err(e)) => format!("ending the capture: {e}"),
                    _ => "the capture recorded nothing".to_string(),
                };
                drop((captured, ended));
                let _ = stream.synchronize();
                // Frees of buffers made inside a broken capture may have left a driver
                // error in the context for a later, unrelated call to report: this failure
                // is reported here, once.
                let _ = stream.context().check_err();
                candle_core::bail!("CUDA graph capture failed: {why}");
            }
        };
        let nodes = count_nodes(&graph)?;
        graph.upload().w()?;
        Ok((
            warm,
            output,
            nodes,
            Graph {
                graph: Some(graph),
                stream,
            },
        ))
    }

    fn count_nodes(graph: &CudaGraph) -> Result<GraphNodes> {
        let cu_graph = graph.cu_graph();
        let mut n = 0usize;
        // SAFETY: the graph is alive; the first call asks for the count, the second fills
        // a buffer of that length.
        unsafe { sys::cuGraphGetNodes(cu_graph, std::ptr::null_mut(), &mut n) }
            .result()
            .w()?;
        let mut handles = vec![std::ptr::null_mut(); n];
        unsafe { sys::cuGraphGetNodes(cu_graph, handles.as_mut_ptr(), &mut n) }
            .result()
            .w()?;
        let mut nodes = GraphNodes::default();
        for handle in handles.into_iter().take(n) {
            let mut kind = CUgraphNodeType::CU_GRAPH_NODE_TYPE_EMPTY;
            // SAFETY: `handle` is a node of the live graph.
            unsafe { sys::cuGraphNodeGetType(handle, &mut kind) }
                .result()
                .w()?;
            match kind {
                CUgraphNodeType::CU_GRAPH_NODE_TYPE_KERNEL => nodes.kernels += 1,
                CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEMCPY => nodes.memcpys += 1,
                CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEMSET => nodes.memsets += 1,
                CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEM_ALLOC => nodes.allocs += 1,
                CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEM_FREE => nodes.frees += 1,
                _ => nodes.other += 1,
            }
        }
        Ok(nodes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launches_count_kernels_copies_and_memsets_only() {
        let nodes = GraphNodes {
            kernels: 10,
            memcpys: 2,
            memsets: 3,
            allocs: 7,
            frees: 7,
            other: 1,
        };
        assert_eq!(nodes.launches(), 15);
    }

    #[test]
    fn capture_off_cuda_is_an_error_that_names_the_device() {
        let err = CapturedForward::capture(&Device::Cpu, || {
            Tensor::zeros(2, candle_core::DType::F32, &Device::Cpu)
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("CUDA graphs need a CUDA device"), "{err}");
        assert!(err.contains("Cpu"), "{err}");
    }
}
