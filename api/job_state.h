// The names of job states as users see them (matctl, the coordinator's store and logs).
// Thread-safety: pure functions.
#pragma once

#include <string>

#include "mat/v1/job.pb.h"

namespace mat::api {

// "QUEUED", "RUNNING", ... (the enum name without JOB_STATE_); "UNSPECIFIED" for anything else.
std::string JobStateName(v1::JobState state);

// True for SUCCEEDED, FAILED and CANCELLED: the job will not change any more.
bool IsTerminalJobState(v1::JobState state);

}  // namespace mat::api
