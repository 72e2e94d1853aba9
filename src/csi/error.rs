//! CSI errors and their one exhaustive mapping to gRPC status codes.

use thiserror::Error;
use tonic::Status;

use crate::store::object::StoreError;

/// Why a CSI call failed. Each variant maps to exactly one gRPC code (see `From` below).
#[derive(Debug, Error)]
pub enum CsiError {
    #[error("{0} is required")]
    Missing(&'static str),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("{0}")]
    Internal(String),
    #[error("{0}")]
    Unimplemented(&'static str),
}

impl From<CsiError> for Status {
    fn from(e: CsiError) -> Status {
        let msg = e.to_string();
        match e {
            CsiError::Missing(_) | CsiError::Invalid(_) => Status::invalid_argument(msg),
            CsiError::NotFound(_) => Status::not_found(msg),
            CsiError::AlreadyExists(_) => Status::already_exists(msg),
            CsiError::FailedPrecondition(_) => Status::failed_precondition(msg),
            CsiError::Aborted(_) => Status::aborted(msg),
            CsiError::Unavailable(_) => Status::unavailable(msg),
            CsiError::PermissionDenied(_) => Status::permission_denied(msg),
            CsiError::ResourceExhausted(_) => Status::resource_exhausted(msg),
            CsiError::OutOfRange(_) => Status::out_of_range(msg),
            CsiError::Internal(_) => Status::internal(msg),
            CsiError::Unimplemented(_) => Status::unimplemented(msg),
        }
    }
}

impl From<StoreError> for CsiError {
    fn from(e: StoreError) -> CsiError {
        let msg = e.to_string();
        match e {
            StoreError::NotFound { .. } => CsiError::NotFound(msg),
            StoreError::Denied { .. } => CsiError::PermissionDenied(msg),
            StoreError::AlreadyExists { .. } => CsiError::AlreadyExists(msg),
            StoreError::Throttled { .. }
            | StoreError::Server { .. }
            | StoreError::Network { .. }
            | StoreError::Timeout { .. }
            | StoreError::Body { .. } => CsiError::Unavailable(msg),
            StoreError::Changed { .. } | StoreError::Request { .. } | StoreError::Io { .. } => {
                CsiError::Internal(msg)
            }
            StoreError::Config(_) => CsiError::Invalid(msg),
        }
    }
}

impl From<crate::store::Error> for CsiError {
    fn from(e: crate::store::Error) -> CsiError {
        use crate::store::Error as E;
        let msg = e.to_string();
        match e {
            E::Store(s) => s.into(),
            E::NoSuchDatastore(_) | E::NoSuchVersion { .. } => CsiError::NotFound(msg),
            E::Name(_) | E::BadUrl(_) => CsiError::Invalid(msg),
            E::Manifest(_) | E::Json { .. } | E::Source(_) => CsiError::Internal(msg),
            E::Mounted { .. } => CsiError::FailedPrecondition(msg),
            E::Busy { .. } | E::LeaseLost(_) => CsiError::Unavailable(msg),
            // The CSI driver reads no HTTP sources; an import's error is an internal one here.
            E::Http(_) => CsiError::Internal(msg),
        }
    }
}

impl From<std::io::Error> for CsiError {
    fn from(e: std::io::Error) -> CsiError {
        CsiError::Internal(e.to_string())
    }
}

pub type CsiResult<T> = Result<T, CsiError>;
