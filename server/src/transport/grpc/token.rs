//! `TokenService` over gRPC: creating, listing and revoking tokens (admin
//! tokens valid for every project); the rules are `app::tokens`.

use strata_proto::v1::token_service_server::TokenService;
use strata_proto::v1::{
    CreateTokenRequest, CreateTokenResponse, ListTokensRequest, ListTokensResponse,
    RevokeTokenRequest, RevokeTokenResponse,
};

use crate::app::tokens::Tokens;

/// gRPC handler of `TokenService`.
#[derive(Debug, Clone)]
pub struct TokenApi(pub Tokens);

#[tonic::async_trait]
impl TokenService for TokenApi {
    async fn create_token(
        &self,
        request: tonic::Request<CreateTokenRequest>,
    ) -> Result<tonic::Response<CreateTokenResponse>, tonic::Status> {
        let principal = crate::app::auth::principal_of(request.extensions())?.clone();
        Ok(tonic::Response::new(
            self.0.create(&principal, request.into_inner()).await?,
        ))
    }

    async fn list_tokens(
        &self,
        request: tonic::Request<ListTokensRequest>,
    ) -> Result<tonic::Response<ListTokensResponse>, tonic::Status> {
        let principal = crate::app::auth::principal_of(request.extensions())?;
        Ok(tonic::Response::new(self.0.list(principal).await?))
    }

    async fn revoke_token(
        &self,
        request: tonic::Request<RevokeTokenRequest>,
    ) -> Result<tonic::Response<RevokeTokenResponse>, tonic::Status> {
        let principal = crate::app::auth::principal_of(request.extensions())?.clone();
        Ok(tonic::Response::new(
            self.0.revoke(&principal, request.into_inner()).await?,
        ))
    }
}
