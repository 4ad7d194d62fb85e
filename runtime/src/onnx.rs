//! Pieces for writing the ONNX graphs the runtime loads (the trainer's export, the test
//! fixtures): the graph's inputs and outputs are f32 tensors whose first dimension is the
//! symbolic batch `N` (any batch size for other engines; [`crate::backbone::Backbone`] runs
//! the graph one image at a time).

use tract_onnx::pb::{
    tensor_proto::DataType, tensor_shape_proto::dimension::Value as DimValue,
    tensor_shape_proto::Dimension, type_proto, TensorShapeProto, TypeProto, ValueInfoProto,
};

/// The name of the symbolic batch dimension.
pub const BATCH_DIM: &str = "N";

/// A named f32 tensor of the given dims (`None` for the symbolic batch).
pub fn float_value_info(name: &str, dims: &[Option<usize>]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Some(v) => DimValue::DimValue(*v as i64),
                None => DimValue::DimParam(BATCH_DIM.into()),
            }),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: DataType::Float as i32,
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}
