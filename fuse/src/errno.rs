//! Client errors as the errno a program expects.

use fuser::Errno;
use quern_proto::ErrorCode;

pub(crate) fn of(e: &quern_client::Error) -> Errno {
    use quern_client::Error as E;
    match e {
        E::Proto(p) => match p.code() {
            Some(code) => of_code(code),
            None => match p {
                quern_proto::Error::Timeout { .. } => Errno::ETIMEDOUT,
                _ => Errno::EIO,
            },
        },
        _ => Errno::EIO,
    }
}

fn of_code(code: ErrorCode) -> Errno {
    match code {
        ErrorCode::NotFound => Errno::ENOENT,
        ErrorCode::AlreadyExists => Errno::EEXIST,
        ErrorCode::IsADirectory => Errno::EISDIR,
        ErrorCode::NotADirectory => Errno::ENOTDIR,
        ErrorCode::NotEmpty => Errno::ENOTEMPTY,
        ErrorCode::InvalidPath | ErrorCode::InvalidArgument => Errno::EINVAL,
        // The namenode refuses changes until enough replicas are reported;
        // retrying later is the right reaction.
        ErrorCode::SafeMode => Errno::EAGAIN,
        ErrorCode::PermissionDenied => Errno::EACCES,
        ErrorCode::NoDatanodes | ErrorCode::NoSpace => Errno::ENOSPC,
        ErrorCode::ChecksumMismatch
        | ErrorCode::LeaseExpired
        | ErrorCode::Protocol
        | ErrorCode::WrongCluster
        | ErrorCode::Io
        | ErrorCode::Internal
        | ErrorCode::Peer => Errno::EIO,
    }
}

/// Errors that are the caller's business (a missing file, a full
/// directory), not the mount's: logged at debug level only.
pub(crate) fn is_expected(e: Errno) -> bool {
    [
        Errno::ENOENT,
        Errno::EEXIST,
        Errno::EISDIR,
        Errno::ENOTDIR,
        Errno::ENOTEMPTY,
        Errno::EINVAL,
        Errno::EACCES,
    ]
    .contains(&e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use quern_proto::error::WireError;

    #[test]
    fn namenode_codes_map_to_posix_errors() {
        let e = |code| quern_client::Error::Proto(WireError::new(code, "x").into());
        assert_eq!(of(&e(ErrorCode::NotFound)), Errno::ENOENT);
        assert_eq!(of(&e(ErrorCode::NotEmpty)), Errno::ENOTEMPTY);
        assert_eq!(of(&e(ErrorCode::AlreadyExists)), Errno::EEXIST);
        assert_eq!(of(&e(ErrorCode::NotADirectory)), Errno::ENOTDIR);
        assert_eq!(of(&e(ErrorCode::PermissionDenied)), Errno::EACCES);
        let timeout = quern_client::Error::Proto(quern_proto::Error::Timeout {
            peer: "namenode".into(),
            what: "stat".into(),
            secs: 1,
        });
        assert_eq!(of(&timeout), Errno::ETIMEDOUT);
    }
}
