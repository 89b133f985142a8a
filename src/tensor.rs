//! A dense fp32 tensor: a shape and a contiguous row-major buffer.
//!
//! Activations inside the network are NHWC (`[N, H, W, C]`, channels fastest) so that a
//! convolution is a GEMM over `[pixels, channels]` without transposes; tensors in files
//! are NCHW and are converted at the edge with [`Tensor::nchw_to_nhwc`] /
//! [`Tensor::nhwc_to_nchw`].

///
/// `D` is the storage: a host `Vec<f32>` (the default, and the CPU backend's buffer) or a
/// backend's device buffer (`Backend::Buf`).
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor<D = Vec<f32>> {
    pub shape: Vec<usize>,
    pub data: D,
}

impl<D> Tensor<D> {
    /// A tensor over an existing buffer (the caller guarantees the size).
    pub fn with_buf(shape: &[usize], data: D) -> Self {
        Tensor { shape: shape.to_vec(), data }
    }

    /// Number of elements of the shape.
    pub fn len_of_shape(&self) -> usize {
        self.shape.iter().product()
    }

    /// Size of the leading (batch) dimension.
    pub fn n(&self) -> usize {
        self.shape[0]
    }

    /// Last (channel, for NHWC) dimension.
    pub fn c(&self) -> usize {
        *self.shape.last().unwrap()
    }
}

impl Tensor {
    pub fn zeros(shape: &[usize]) -> Self {
        Tensor { shape: shape.to_vec(), data: vec![0.0; shape.iter().product()] }
    }

    pub fn full(shape: &[usize], v: f32) -> Self {
        Tensor { shape: shape.to_vec(), data: vec![v; shape.iter().product()] }
    }

    /// Panics if `data.len()` does not match the shape: callers inside the crate
    /// construct these; user input is validated before it gets here.
    pub fn from_vec(shape: &[usize], data: Vec<f32>) -> Self {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "shape {:?} vs len {}", shape, data.len());
        Tensor { shape: shape.to_vec(), data }
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }

    pub fn reshape(mut self, shape: &[usize]) -> Self {
        assert_eq!(shape.iter().product::<usize>(), self.data.len());
        self.shape = shape.to_vec();
        self
    }

    /// `[N, C, H, W]` → `[N, H, W, C]`.
    pub fn nchw_to_nhwc(&self) -> Tensor {
        let (n, c, h, w) = (self.shape[0], self.shape[1], self.shape[2], self.shape[3]);
        let mut out = vec![0.0f32; self.data.len()];
        for b in 0..n {
            for ch in 0..c {
                for p in 0..h * w {
                    out[(b * h * w + p) * c + ch] = self.data[(b * c + ch) * h * w + p];
                }
            }
        }
        Tensor::from_vec(&[n, h, w, c], out)
    }

    /// `[N, H, W, C]` → `[N, C, H, W]`.
    pub fn nhwc_to_nchw(&self) -> Tensor {
        let (n, h, w, c) = (self.shape[0], self.shape[1], self.shape[2], self.shape[3]);
        let mut out = vec![0.0f32; self.data.len()];
        for b in 0..n {
            for p in 0..h * w {
                for ch in 0..c {
                    out[(b * c + ch) * h * w + p] = self.data[(b * h * w + p) * c + ch];
                }
            }
        }
        Tensor::from_vec(&[n, c, h, w], out)
    }

    /// Root mean square of all elements (f64 accumulation).
    pub fn rms(&self) -> f64 {
        if self.data.is_empty() {
            return 0.0;
        }
        (self.data.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / self.data.len() as f64).sqrt()
    }
}
