//! SQL functions in schema `changerelay`.

mod metadata;
